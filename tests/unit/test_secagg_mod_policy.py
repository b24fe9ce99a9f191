"""client/secagg_mod.node_policy_file on a simulated node: the partition-id-th institution folder
(name order) of ``sim.policy-dir``, listed once per directory state rather than on every
message (listing 1,000 folders per message made each node's work grow with n, issue 33)."""

from __future__ import annotations

import os

from flwr.app import Context, RecordDict

from fedrec.client import secagg_mod


def _ctx(root, pid: int) -> Context:
    return Context(run_id=1, node_id=9, node_config={"partition-id": pid, "num-partitions": 3}, state=RecordDict(),
                   run_config={"sim.policy-dir": str(root)})


def test_the_simulated_node_finds_its_policy_and_the_listing_follows_the_directory(tmp_path, monkeypatch):
    for name in ("b", "a", "c"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "privacy.toml").write_text("")
    listed = []
    real = secagg_mod._policy_folders.__wrapped__

    def counting(root, mtime):
        listed.append(root)
        return real(root, mtime)

    monkeypatch.setattr(secagg_mod, "_policy_folders", secagg_mod.lru_cache(maxsize=8)(counting))
    assert secagg_mod.node_policy_file(_ctx(tmp_path, 1)) == tmp_path / "b" / "privacy.toml"
    for pid in (0, 1, 2, 0):
        secagg_mod.node_policy_file(_ctx(tmp_path, pid))
    assert len(listed) == 1  # once for this directory state, not once per message
    (tmp_path / "aa").mkdir()
    (tmp_path / "aa" / "privacy.toml").write_text("")
    st = (tmp_path).stat()
    os.utime(tmp_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # coarse-mtime filesystems
    assert secagg_mod.node_policy_file(_ctx(tmp_path, 1)) == tmp_path / "aa" / "privacy.toml"
    assert len(listed) == 2
    assert secagg_mod.node_policy_file(_ctx(tmp_path, 7)) is None  # no such partition
