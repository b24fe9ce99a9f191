"""The SecAgg+ neighbour graph (Bell et al. 2020): a Harary graph over a random order.

Private. ``k`` = 0 or ``k >= n - 1`` gives the complete graph (original SecAgg). Otherwise
nodes are placed on a ring in a uniformly random order (``secrets``) and each is linked to
its ``k/2`` nearest on either side (k rounded up to even): a k-regular graph whose vertex
connectivity is k, so no set of fewer than k dropouts can split the survivors.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterable, Mapping, Sequence


def harary(indices: Sequence[int], k: int) -> dict[int, list[int]]:
    idx = list(indices)
    n = len(idx)
    if k <= 0 or k >= n - 1:
        return {i: [j for j in idx if j != i] for i in idx}
    half = (k + 1) // 2
    order = idx[:]
    for i in range(n - 1, 0, -1):  # Fisher-Yates with a CSPRNG
        j = secrets.randbelow(i + 1)
        order[i], order[j] = order[j], order[i]
    nbrs: dict[int, set[int]] = {i: set() for i in idx}
    for pos, node in enumerate(order):
        for step in range(1, half + 1):
            other = order[(pos + step) % n]
            nbrs[node].add(other)
            nbrs[other].add(node)
    return {i: sorted(s) for i, s in nbrs.items()}


def default_degree(n: int) -> int:
    """An O(log n) degree (Bell et al.): the smallest even k >= 2 log2 n; complete graph up to 20.

    The honest-but-curious server learns only sums over connected survivor sets (the workflow
    refuses to unmask a split one). H(n, k) survives any k - 1 dropouts; splitting it takes two
    runs of k/2 consecutive dropped ring positions: with 30 % random dropouts and n = 100
    (k = 14) that is a ~1e-4 event, which fails the round loudly rather than leak.
    """
    import math

    if n <= 20:
        return 0
    k = math.ceil(2 * math.log2(n))
    return k + (k % 2)


def connected(nodes: Iterable[int], nbrs: Mapping[int, Sequence[int]]) -> bool:
    """Is the subgraph induced by ``nodes`` connected? (Otherwise unmasking reveals partial sums.)"""
    alive = set(nodes)
    if not alive:
        return True
    start = next(iter(alive))
    seen = {start}
    stack = [start]
    while stack:
        u = stack.pop()
        for v in nbrs[u]:
            if v in alive and v not in seen:
                seen.add(v)
                stack.append(v)
    return seen == alive


def sample(indices: Sequence[int], k: int) -> list[int]:
    """``k`` distinct elements chosen uniformly with a CSPRNG."""
    pool = list(indices)
    out = []
    for _ in range(min(k, len(pool))):
        out.append(pool.pop(secrets.randbelow(len(pool))))
    return out


# ------------------------------------------------------------------ the session plan
class SeededDraw:
    """Deterministic uniform draws from a 256-bit seed (SHAKE-256 stream): every participant
    recomputes the same graph and committee from the signed advertisements (public, but not
    the server's to choose)."""

    def __init__(self, seed: bytes):
        import hashlib

        self._xof = hashlib.shake_256(seed)
        self._pos = 0
        self._buf = b""

    def below(self, n: int) -> int:
        if self._pos + 16 > len(self._buf):
            self._buf = self._xof.digest(max(4096, 2 * len(self._buf)))
        v = int.from_bytes(self._buf[self._pos:self._pos + 16], "big")  # 128 bits: bias < 2^-100
        self._pos += 16
        return v % n


def plan(members: Sequence[int], degree: int, committee_size: int, seed: bytes) -> tuple[dict[int, list[int]], list[int]]:
    """(neighbour graph, committee) of a session, a function of the members, the degree, the
    committee size and the seed only (a Harary graph over a seeded ring order; a seeded sample)."""
    idx = sorted(members)
    n = len(idx)
    draw = SeededDraw(seed)
    if degree <= 0 or degree >= n - 1:
        nbrs = {i: [j for j in idx if j != i] for i in idx}
    else:
        half = (degree + 1) // 2
        order = idx[:]
        for i in range(n - 1, 0, -1):
            j = draw.below(i + 1)
            order[i], order[j] = order[j], order[i]
        sets: dict[int, set[int]] = {i: set() for i in idx}
        for pos, node in enumerate(order):
            for step in range(1, half + 1):
                other = order[(pos + step) % n]
                sets[node].add(other)
                sets[other].add(node)
        nbrs = {i: sorted(s) for i, s in sets.items()}
    pool = idx[:]
    committee = sorted(pool.pop(draw.below(len(pool))) for _ in range(min(committee_size, n)))
    return nbrs, committee


def min_live_neighbours(k: int) -> int:
    """A survivor whose self seed is revealed keeps at least this many surviving neighbours
    (a quarter of its k, at least 1): the server cannot strip its pairwise masks by reporting
    its neighbours dropped, and only all of its surviving neighbours colluding can."""
    return max(1, -(-k // 4))
