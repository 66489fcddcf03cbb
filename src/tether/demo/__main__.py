import sys

from tether.demo.apps import main

sys.exit(main())
