"""The API reference and guides build with zero warnings (issue 33): `make docs` = `mkdocs build --strict`.

mkdocs and mkdocstrings come with the test extra, so this runs wherever the tests run; a broken link between the
docs, a page missing from the nav, or a docstring mkdocstrings cannot render fails here (~10 s).
"""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_the_docs_build_strict_with_no_warnings(tmp_path):
    import mkdocs  # noqa: F401  the test extra installs it; an ImportError here means `pip install -e ".[test]"`
    import mkdocstrings  # noqa: F401

    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                           str(REPO / "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log
    warnings = [line for line in log.splitlines() if "WARNING" in line or "ERROR" in line]
    assert not warnings, "\n".join(warnings)
    site = tmp_path / "site"
    for page in ("api/client", "api/models", "api/he", "api/data", "api/service"):
        assert (site / page / "index.html").is_file(), page
    client = (site / "api" / "client" / "index.html").read_text()
    assert 'id="medhe.service.client.Client.diagnose"' in client  # rendered from the docstrings, not just a title
    he = (site / "api" / "he" / "index.html").read_text()
    for entry in ("medhe.he.scheme.compile_model", "medhe.he.ckks.server.compile_ckks",
                  "medhe.he.tfhe.compiler.compile_tfhe", "medhe.he.paillier.server.compile_paillier"):
        assert f'id="{entry}"' in he, entry
    assert (site / "tutorial.ipynb").is_file()
