"""`python -m tvix_mountd.workers`: a worker process, as the supervisor starts it."""

from tvix_mountd.workers.process import main

main()
