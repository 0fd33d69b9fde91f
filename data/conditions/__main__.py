"""``python -m recorun.data.conditions [FOLDER]``: write the HCAL payload files."""
import sys

from recorun.data.conditions import main

sys.exit(main())
