import sys

from yatdeploy.cli import main

sys.exit(main())
