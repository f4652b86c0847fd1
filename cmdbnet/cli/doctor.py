"""``cmdb doctor``: what will run where (devices, versions, scan backend per device)."""

from __future__ import annotations

import typer

from cmdbnet.cli.common import JsonFlag, cli_errors, console, print_json

_WHY = {
    "native": "cmdbnet's C scan (CPU, compiled at first use)",
    "torch": "chunked torch scan (CPU without a C compiler, fp64)",
    "torch_parallel": "log-depth torch scan (few kernel launches)",
    "triton": "cmdbnet's Triton kernels (compiled at first use)",
    "mamba_ssm": "mamba-ssm's fused CUDA kernel",
}


@cli_errors
def doctor(as_json: bool = JsonFlag) -> None:
    """Devices, torch/CUDA/cuDNN versions, and which selective scan runs on each device.

    The scan runs mamba-ssm's kernel on CUDA tensors when it imports, else cmdbnet's Triton
    kernels, else a launch-light torch scan; CPU tensors run cmdbnet's C scan, built at first
    use with the system's C compiler, else the chunked torch scan.
    CMDB_SCAN_BACKEND=auto|native|torch|torch_parallel|triton|mamba_ssm forces one.

    Examples:

      cmdb doctor

      cmdb doctor --json

      CMDB_SCAN_BACKEND=torch_parallel cmdb doctor
    """
    from cmdbnet.diagnostics import environment_report  # start-up time: imports torch and triton

    report = environment_report()
    if as_json:
        print_json(report)
        return
    from rich.table import Table

    cuda = report["cuda"] or ("ROCm " + report["hip"] if report["hip"] else "none (CPU build)")
    console.print(f"torch {report['torch']} | CUDA {cuda} | cuDNN {report['cudnn'] or '-'}")
    console.print(f"Python {report['python']} on {report['platform']}")
    devices = Table(title="devices")
    for col in ("device", "name", "details"):
        devices.add_column(col)
    for d in report["devices"]:
        details = (f"{d['threads']} threads" if d["device"] == "cpu"
                   else f"compute {d['capability']}, {d['memory_gib']} GiB")
        devices.add_row(d["device"], d["name"], details)
    if not report["cuda_available"]:
        devices.caption = "no CUDA device visible to torch"
    console.print(devices)
    scans = Table(title=f"selective scan (CMDB_SCAN_BACKEND={report['scan_backend_env']})")
    for col in ("tensors on", "backend", "what it is"):
        scans.add_column(col)
    for dev, backend in report["scan_backend"].items():
        scans.add_row(dev, backend.split(":")[0], _WHY.get(backend, backend))
    native = report["native_scan"]
    threads = "torch's OpenMP threads" if native.get("openmp") else "Python threads (built without OpenMP)"
    scans.caption = (f"C scan library: {native['library']}, on {threads}" if native["ok"]
                     else f"C scan unavailable: {native['reason']}")
    console.print(scans)
    libs = Table(title="optional GPU libraries")
    for col in ("library", "version", "imports", "why not"):
        libs.add_column(col)
    for name, info in report["optional"].items():
        libs.add_row(name, info["version"] or "-", "yes" if info["ok"] else "no", info["reason"] or "")
    console.print(libs)


def register(app: typer.Typer) -> None:
    app.command("doctor")(doctor)
