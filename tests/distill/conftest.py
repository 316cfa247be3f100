"""Real English text for the distillation tests: Python's own `pydoc_data.topics`, as JSON lines."""
import json

import pytest


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("text") / "topics.jsonl"
    with open(path, "w") as f:
        for name in sorted(topics)[:60]:
            f.write(json.dumps({"text": topics[name][:1500], "source": name}) + "\n")
    return path
