"""``python -m cmdbnet``: the same as ``cmdb`` (and what ``torchrun -m cmdbnet`` runs)."""

from cmdbnet.cli import main

if __name__ == "__main__":
    main()
