"""SecAgg+ (Bonawitz et al. 2017, sparse graph of Bell et al. 2020) for fedrec.

Like ``cryptography``'s ``hazmat`` layer, the protocol's primitives live in private modules
(``_shamir``, ``_keys``, ``_masking``, ``_quantize``, ``_graph``, ``_identity``, ``_wire``) and are
not an API. The two
safe entries are:

* :class:`SecAggClient` — a node's protocol state machine (used by ``client/secagg_mod.py``);
* :class:`ServerSession` — the server's session bookkeeping and unmasking (used by
  ``server/secagg_workflow.py``).

Design and security argument: docs/secure-aggregation.md.
"""

from fedrec.common.secagg._client import ClientState, SecAggClient
from fedrec.common.secagg._errors import SecAggError, SecAggProtocolError
from fedrec.common.secagg._quantize import QuantParams, derive as derive_quantization
from fedrec.common.secagg._server import ServerSession

__all__ = [
    "SecAggClient",
    "ClientState",
    "ServerSession",
    "SecAggError",
    "SecAggProtocolError",
    "QuantParams",
    "derive_quantization",
]
