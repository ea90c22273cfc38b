# Set-up, identical in every chapter: install moe_lib where it is missing (Colab), then select the
# book's plotly renderer. MOE_LIB_SOURCE equals _config.yml's repository url (checked by tests/test_book.py).
import importlib.util
import subprocess
import sys

MOE_LIB_SOURCE = "git+https://github.com/moe-book/deepseek-moe-book@main"
if importlib.util.find_spec("moe_lib") is None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", f"moe_lib[book] @ {MOE_LIB_SOURCE}"],
                   check=True)

from moe_lib.viz import setup_notebook  # noqa: E402

_ = setup_notebook()
