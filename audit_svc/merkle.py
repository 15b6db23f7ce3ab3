"""RFC 6962 / RFC 9162 Merkle tree: incremental tree, proofs, and proof verification.

The tree stores, for every level k, the hashes of the full subtrees of 2**k leaves as one
contiguous ``bytearray`` (32 bytes each). Level k of a tree of n leaves holds n >> k
hashes, so the whole tree costs about 64 bytes per leaf and an append touches at most
log2(n) levels. Subtrees that are not full (the ragged right edge of a tree of any size)
are never stored: they are computed on demand from at most log2(n) stored hashes, which is
what lets the same structure answer for the root and proofs of every earlier size.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterable, Sequence

from cabincrew.errors import InvalidArgument

HASH_SIZE = 32
EMPTY_ROOT = hashlib.sha256(b"").digest()

_LEAF_PREFIX = b"\x00"
_NODE_PREFIX = b"\x01"
_BULK_CHUNK = 1 << 16


class MerkleError(InvalidArgument):
    """A tree size, leaf index or hash that the tree cannot accept or answer for."""


def leaf_hash(data: bytes) -> bytes:
    """Return the RFC 6962 leaf hash SHA-256(0x00 || data)."""
    return hashlib.sha256(_LEAF_PREFIX + data).digest()


def node_hash(left: bytes, right: bytes) -> bytes:
    """Return the RFC 6962 interior node hash SHA-256(0x01 || left || right)."""
    return hashlib.sha256(_NODE_PREFIX + left + right).digest()


def _split(n: int) -> int:
    """Largest power of two strictly smaller than ``n`` (n >= 2)."""
    return 1 << ((n - 1).bit_length() - 1)


class MerkleTree:
    """An append-only Merkle tree over leaf hashes that answers for every size it has had."""

    __slots__ = ("_levels",)

    def __init__(self) -> None:
        self._levels: list[bytearray] = [bytearray()]

    @classmethod
    def from_leaf_hashes(cls, leaf_hashes: Iterable[bytes]) -> MerkleTree:
        """Build a tree from leaf hashes in order."""
        tree = cls()
        tree.append_many(leaf_hashes)
        return tree

    @property
    def size(self) -> int:
        """Number of leaves."""
        return len(self._levels[0]) // HASH_SIZE

    def __len__(self) -> int:
        return self.size

    def __repr__(self) -> str:
        return f"MerkleTree(size={self.size})"

    def append(self, leaf_hash: bytes) -> int:
        """Append one leaf hash and return its index."""
        if len(leaf_hash) != HASH_SIZE:
            raise MerkleError(f"a leaf hash is {HASH_SIZE} bytes, got {len(leaf_hash)}")
        levels = self._levels
        index = len(levels[0]) // HASH_SIZE
        levels[0] += leaf_hash
        count, level = index + 1, 0
        # Each trailing one bit of the new size completes one more full subtree above.
        while count & 1 == 0:
            below = levels[level]
            parent = hashlib.sha256(_NODE_PREFIX + below[-2 * HASH_SIZE :]).digest()
            level += 1
            if level == len(levels):
                levels.append(bytearray())
            levels[level] += parent
            count >>= 1
        return index

    def append_many(self, leaf_hashes: Iterable[bytes]) -> int:
        """Append leaf hashes in order, level by level; return the index of the first one."""
        first = self.size
        source = iter(leaf_hashes)
        # Chunks bound the transient copy while loading millions of leaves at startup.
        while chunk := list(itertools.islice(source, _BULK_CHUNK)):
            for item in chunk:
                if len(item) != HASH_SIZE:
                    self._truncate(first)
                    raise MerkleError(f"a leaf hash is {HASH_SIZE} bytes, got {len(item)}")
            self._levels[0] += b"".join(chunk)
            self._complete_levels()
        return first

    def _truncate(self, size: int) -> None:
        """Drop leaves past ``size``, so that a refused batch leaves no trace."""
        for level, hashes in enumerate(self._levels):
            del hashes[(size >> level) * HASH_SIZE :]

    def _complete_levels(self) -> None:
        """Hash every full subtree that the leaves added since the last call completed."""
        levels = self._levels
        size = len(levels[0]) // HASH_SIZE
        sha256 = hashlib.sha256
        pair = 2 * HASH_SIZE
        level = 0
        while size >> (level + 1):
            if level + 1 == len(levels):
                levels.append(bytearray())
            below, above = levels[level], levels[level + 1]
            done, wanted = len(above) // HASH_SIZE, size >> (level + 1)
            if done == wanted:
                break
            with memoryview(below) as view:
                above += b"".join(
                    [
                        sha256(_NODE_PREFIX + view[offset : offset + pair]).digest()
                        for offset in range(done * pair, wanted * pair, pair)
                    ]
                )
            level += 1

    def leaf(self, index: int) -> bytes:
        """Return the leaf hash at ``index``."""
        if not 0 <= index < self.size:
            raise MerkleError(f"leaf index {index} is outside a tree of size {self.size}")
        offset = index * HASH_SIZE
        return bytes(self._levels[0][offset : offset + HASH_SIZE])

    def root(self, size: int | None = None) -> bytes:
        """Return the root hash of the tree of the first ``size`` leaves (default: all)."""
        size = self.size if size is None else size
        self._check_size(size)
        if size == 0:
            return EMPTY_ROOT
        return self._subtree(0, size)

    def inclusion_proof(self, index: int, size: int) -> list[bytes]:
        """Return the RFC 9162 inclusion proof of leaf ``index`` in the tree of ``size`` leaves."""
        self._check_size(size)
        if not 0 <= index < size:
            raise MerkleError(f"leaf index {index} is outside a tree of size {size}")
        proof: list[bytes] = []
        start, end = 0, size
        while end - start > 1:
            half = start + _split(end - start)
            if index < half:
                proof.append(self._subtree(half, end))
                end = half
            else:
                proof.append(self._subtree(start, half))
                start = half
        proof.reverse()
        return proof

    def consistency_proof(self, size1: int, size2: int) -> list[bytes]:
        """Return the RFC 9162 consistency proof between the trees of ``size1`` and ``size2``."""
        self._check_size(size2)
        if not 0 < size1 <= size2:
            # A proof from the empty tree proves nothing; verifiers reject it.
            raise MerkleError(f"no consistency proof from size {size1} to size {size2}")
        proof: list[bytes] = []
        start, end, old = 0, size2, size1
        complete = True
        while old != end - start:
            half = _split(end - start)
            if old <= half:
                proof.append(self._subtree(start + half, end))
                end = start + half
            else:
                proof.append(self._subtree(start, start + half))
                start += half
                old -= half
                complete = False
        if not complete:
            proof.append(self._subtree(start, end))
        proof.reverse()
        return proof

    def _check_size(self, size: int) -> None:
        if not 0 <= size <= self.size:
            raise MerkleError(f"tree size {size} is outside 0..{self.size}")

    def _subtree(self, start: int, end: int) -> bytes:
        """Hash of leaves [start, end) for a range that occurs in the RFC 6962 recursion."""
        width = end - start
        if width & (width - 1) == 0 and start % width == 0:
            level = width.bit_length() - 1
            offset = (start >> level) * HASH_SIZE
            return bytes(self._levels[level][offset : offset + HASH_SIZE])
        half = start + _split(width)
        return node_hash(self._subtree(start, half), self._subtree(half, end))


def root_from_leaves(leaf_hashes: Iterable[bytes]) -> bytes:
    """Return the root over leaf hashes in order, streaming in O(log n) memory."""
    # The stack holds the roots of the full subtrees seen so far, largest first.
    stack: list[tuple[int, bytes]] = []
    for item in leaf_hashes:
        if len(item) != HASH_SIZE:
            raise MerkleError(f"a leaf hash is {HASH_SIZE} bytes, got {len(item)}")
        width, digest = 1, bytes(item)
        while stack and stack[-1][0] == width:
            _, left = stack.pop()
            width, digest = 2 * width, node_hash(left, digest)
        stack.append((width, digest))
    if not stack:
        return EMPTY_ROOT
    _, digest = stack.pop()
    while stack:
        _, left = stack.pop()
        digest = node_hash(left, digest)
    return digest


def verify_inclusion(
    leaf_hash: bytes, index: int, size: int, proof: Sequence[bytes], root: bytes
) -> bool:
    """Check an inclusion proof as specified in RFC 9162 section 2.1.3.2."""
    if not 0 <= index < size:
        return False
    if len(leaf_hash) != HASH_SIZE or any(len(p) != HASH_SIZE for p in proof):
        return False
    fn, sn = index, size - 1
    digest = leaf_hash
    for p in proof:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            digest = node_hash(p, digest)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            digest = node_hash(digest, p)
        fn >>= 1
        sn >>= 1
    return sn == 0 and digest == root


def verify_consistency(
    size1: int, size2: int, proof: Sequence[bytes], root1: bytes, root2: bytes
) -> bool:
    """Check a consistency proof as specified in RFC 9162 section 2.1.4.2."""
    if size1 <= 0 or size2 < size1:
        # Consistency with the empty tree is trivially true and proves nothing.
        return False
    if size1 == size2:
        return not proof and root1 == root2
    if not proof or any(len(p) != HASH_SIZE for p in proof):
        return False
    path = list(proof)
    if size1 & (size1 - 1) == 0:
        path.insert(0, root1)
    fn, sn = size1 - 1, size2 - 1
    while fn & 1:
        fn >>= 1
        sn >>= 1
    first = second = path[0]
    for c in path[1:]:
        if sn == 0:
            return False
        if fn & 1 or fn == sn:
            first = node_hash(c, first)
            second = node_hash(c, second)
            while not fn & 1 and fn != 0:
                fn >>= 1
                sn >>= 1
        else:
            second = node_hash(second, c)
        fn >>= 1
        sn >>= 1
    return first == root1 and second == root2 and sn == 0
