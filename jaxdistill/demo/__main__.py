"""``python -m jaxdistill.demo``: see :mod:`jaxdistill.demo`."""

from jaxdistill.demo.run import main

raise SystemExit(main())
