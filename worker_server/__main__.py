import sys

from worker_server.cli import main

sys.exit(main())
