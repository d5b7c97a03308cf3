import sys

from zenith_onnx.cli import main

sys.exit(main())
