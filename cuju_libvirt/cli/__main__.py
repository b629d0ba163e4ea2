import sys

from cuju_libvirt.cli import main

sys.exit(main())
