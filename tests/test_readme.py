"""The README's example runs as written."""

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_readme_example_runs():
    (example,) = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    namespace = {}
    exec(compile(example, str(README), "exec"), namespace)
    result = namespace["result"]
    assert result.projected_loss.shape == (21, 400, 12)
    assert all(c.direction in namespace["kept"].nonzero()[0] for c in namespace["clusterings"])
