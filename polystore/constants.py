"""Upstream PolyStore's ``polystore.constants``: ``Backend.DISK`` and friends.

``Backend`` here is the same object as ``polystore.Backend`` (the abstract base class of the
custom-backends guide); its metaclass also answers upstream's enum spellings with members of
:class:`~polystore.base.BackendName` (see :mod:`polystore.base`).
"""

from polystore.base import Backend, BackendName

#: Upstream's default backend name.
DEFAULT_BACKEND = BackendName.MEMORY

__all__ = ["DEFAULT_BACKEND", "Backend", "BackendName"]
