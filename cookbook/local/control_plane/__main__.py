"""`python -m cookbook.local.control_plane`: the control plane process (the CLI is `app.main`)."""

from cookbook.local.control_plane.app import main

if __name__ == "__main__":
    main()
