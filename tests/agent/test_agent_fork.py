"""`moonlet agent fork`: a copy of a session at a checkpoint continues on its own; the original is
unchanged, and the copy's model calls carry the transcript up to that checkpoint only."""

import subprocess
import sys

from agent_scripted import Reply, ScriptedEndpoint, blocks, text

from moonlet.agent.store import SessionStore


def _texts(body):
    return [b.get("text", "") for m in body["messages"] for b in blocks(m) if b.get("type") == "text"]


def test_fork_continues_from_a_checkpoint(tmp_path):
    db = tmp_path / "s.db"

    def script(body):
        return Reply([text(f"answer {len(body['messages'])}")])

    def cli(*args, input=None):
        with ScriptedEndpoint(script) as ep:
            out = subprocess.run([sys.executable, "-m", "moonlet", "agent", *args, "--base-url", ep.url,
                                  "--model-name", "scripted", "--db", str(db), "--workdir", str(tmp_path), "-q"],
                                 input=input, capture_output=True, text=True, timeout=120)
            return out, ep.requests

    out, _ = cli("run", "first question", "--session-id", "orig")
    assert out.returncode == 0, out.stderr
    out, _ = cli("resume", "orig", "second question")
    assert out.returncode == 0, out.stderr
    store = SessionStore(db)
    first_step = store.checkpoints("orig")[0]["step"]
    before = [m["content"] for m in store.messages("orig")]
    store.close()

    fork = subprocess.run([sys.executable, "-m", "moonlet", "agent", "fork", "orig", "--step", str(first_step),
                           "--session-id", "alt", "--db", str(db)], capture_output=True, text=True, timeout=60)
    assert fork.returncode == 0 and fork.stdout.strip() == "alt", fork.stderr
    out, requests = cli("resume", "alt", "another second question")
    assert out.returncode == 0, out.stderr
    sent = _texts(requests[-1])
    assert "first question" in sent and "another second question" in sent and "second question" not in sent
    store = SessionStore(db)
    assert [m["content"] for m in store.messages("orig")] == before  # the original is as it was
    assert store.get_session("alt")["task"] == "first question"
    store.close()
    bad = subprocess.run([sys.executable, "-m", "moonlet", "agent", "fork", "orig", "--step", "-5", "--db", str(db)],
                         capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "no checkpoint at or before step -5" in bad.stderr
