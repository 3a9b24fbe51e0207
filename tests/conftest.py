import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # the test captioners: `from captioners import ...`

# tests/keras/ needs a Keras backend chosen before keras is imported: tests/test_keras.py runs it once per backend,
# each in its own process (which sets ATTNHOOK_KERAS_CASES); the main run does not import keras at all
if not os.environ.get("ATTNHOOK_KERAS_CASES"):
    collect_ignore = ["keras"]
