"""The README's quick start as a new user follows it."""

from pathlib import Path

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def test_the_openai_snippet_says_how_to_install_the_client():
    # the first set-up command installs the project without extras; the snippet needs `openai`
    before = README[: README.index("from openai import OpenAI")]
    last_block = before.rindex("```python")
    prose = before[before.rindex("```", 0, last_block) + 3 : last_block]
    assert "pip install openai" in prose
