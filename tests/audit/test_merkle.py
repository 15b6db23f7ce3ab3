"""The Merkle tree against the published RFC 6962 vectors and the RFC's own definitions."""

from __future__ import annotations

import base64
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from audit_svc.merkle import (
    EMPTY_ROOT,
    MerkleError,
    MerkleTree,
    leaf_hash,
    node_hash,
    root_from_leaves,
    verify_consistency,
    verify_inclusion,
)

VECTORS = Path(__file__).resolve().parents[2].parent / "shared" / "testvectors" / "rfc6962"
MISSING = f"RFC 6962 test vectors not found at {VECTORS}"


def _vector_params(kind: str) -> list[Any]:
    files = sorted((VECTORS / kind).glob("*/*.json"))
    if not files:
        return [pytest.param(None, marks=pytest.mark.skip(reason=MISSING))]
    return [pytest.param(path, id=str(path.relative_to(VECTORS / kind))) for path in files]


def _b64(value: str | None) -> bytes:
    return base64.b64decode(value) if value else b""


def _proof(vector: dict[str, Any]) -> list[bytes]:
    return [_b64(item) for item in vector["proof"] or []]


def _leaves(count: int) -> list[bytes]:
    return [leaf_hash(i.to_bytes(8, "big")) for i in range(count)]


def _spec_root(leaves: list[bytes]) -> bytes:
    """MTH straight from RFC 9162 section 2.1.1."""
    if not leaves:
        return EMPTY_ROOT
    if len(leaves) == 1:
        return leaves[0]
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    return node_hash(_spec_root(leaves[:k]), _spec_root(leaves[k:]))


def _spec_path(m: int, leaves: list[bytes]) -> list[bytes]:
    """PATH(m, D[n]) straight from RFC 9162 section 2.1.3.1."""
    if len(leaves) == 1:
        return []
    k = 1 << ((len(leaves) - 1).bit_length() - 1)
    if m < k:
        return [*_spec_path(m, leaves[:k]), _spec_root(leaves[k:])]
    return [*_spec_path(m - k, leaves[k:]), _spec_root(leaves[:k])]


def _spec_subproof(m: int, leaves: list[bytes], complete: bool) -> list[bytes]:
    """SUBPROOF(m, D[n], b) straight from RFC 9162 section 2.1.4.1."""
    n = len(leaves)
    if m == n:
        return [] if complete else [_spec_root(leaves)]
    k = 1 << ((n - 1).bit_length() - 1)
    if m <= k:
        return [*_spec_subproof(m, leaves[:k], complete), _spec_root(leaves[k:])]
    return [*_spec_subproof(m - k, leaves[k:], False), _spec_root(leaves[:k])]


@pytest.fixture(scope="module")
def roots() -> dict[str, Any]:
    path = VECTORS / "roots.json"
    if not path.exists():
        pytest.skip(MISSING)
    data: dict[str, Any] = json.loads(path.read_text())
    return data


@pytest.fixture(scope="module")
def vector_tree(roots: dict[str, Any]) -> MerkleTree:
    tree = MerkleTree()
    for item in roots["leaf_inputs_hex"]:
        tree.append(leaf_hash(bytes.fromhex(item)))
    return tree


def test_empty_tree_root_is_the_hash_of_the_empty_string() -> None:
    assert MerkleTree().root() == hashlib.sha256(b"").digest() == EMPTY_ROOT
    assert root_from_leaves([]) == EMPTY_ROOT


def test_roots_of_every_size_equal_the_published_roots(
    roots: dict[str, Any], vector_tree: MerkleTree
) -> None:
    leaves = [leaf_hash(bytes.fromhex(item)) for item in roots["leaf_inputs_hex"]]
    for size, expected in enumerate(roots["root_hashes_hex_by_tree_size"]):
        assert vector_tree.root(size).hex() == expected
        assert root_from_leaves(leaves[:size]).hex() == expected
        assert MerkleTree.from_leaf_hashes(leaves[:size]).root().hex() == expected


@pytest.mark.parametrize("path", _vector_params("inclusion"))
def test_inclusion_vector_verifies_exactly_when_it_is_valid(path: Path) -> None:
    vector = json.loads(path.read_text())
    ok = verify_inclusion(
        _b64(vector["leafHash"]),
        vector["leafIdx"],
        vector["treeSize"],
        _proof(vector),
        _b64(vector["root"]),
    )
    assert ok is not vector["wantErr"]


@pytest.mark.parametrize("path", _vector_params("consistency"))
def test_consistency_vector_verifies_exactly_when_it_is_valid(path: Path) -> None:
    vector = json.loads(path.read_text())
    ok = verify_consistency(
        vector["size1"],
        vector["size2"],
        _proof(vector),
        _b64(vector["root1"]),
        _b64(vector["root2"]),
    )
    assert ok is not vector["wantErr"]


def test_generated_inclusion_proofs_equal_the_published_proofs(vector_tree: MerkleTree) -> None:
    compared = 0
    for path in sorted((VECTORS / "inclusion").glob("*/*.json")):
        vector = json.loads(path.read_text())
        index, size = vector["leafIdx"], vector["treeSize"]
        if vector["wantErr"] or size > vector_tree.size:
            continue
        if _b64(vector["root"]) != vector_tree.root(size):
            continue
        assert vector_tree.leaf(index) == _b64(vector["leafHash"])
        assert vector_tree.inclusion_proof(index, size) == _proof(vector)
        compared += 1
    assert compared > 0


def test_generated_consistency_proofs_equal_the_published_proofs(vector_tree: MerkleTree) -> None:
    compared = 0
    for path in sorted((VECTORS / "consistency").glob("*/*.json")):
        vector = json.loads(path.read_text())
        size1, size2 = vector["size1"], vector["size2"]
        if vector["wantErr"] or size2 > vector_tree.size:
            continue
        if _b64(vector["root2"]) != vector_tree.root(size2):
            continue
        assert vector_tree.root(size1) == _b64(vector["root1"])
        assert vector_tree.consistency_proof(size1, size2) == _proof(vector)
        compared += 1
    assert compared > 0


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=300), st.data())
def test_generated_inclusion_proofs_verify_and_match_the_rfc_definition(
    size: int, data: st.DataObject
) -> None:
    leaves = _leaves(size)
    tree = MerkleTree.from_leaf_hashes(leaves)
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    proof = tree.inclusion_proof(index, size)
    assert proof == _spec_path(index, leaves)
    assert verify_inclusion(leaves[index], index, size, proof, tree.root())


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=1, max_value=300), st.data())
def test_generated_consistency_proofs_verify_and_match_the_rfc_definition(
    size2: int, data: st.DataObject
) -> None:
    leaves = _leaves(size2)
    tree = MerkleTree.from_leaf_hashes(leaves)
    size1 = data.draw(st.integers(min_value=1, max_value=size2))
    proof = tree.consistency_proof(size1, size2)
    if size1 < size2:
        assert proof == _spec_subproof(size1, leaves, True)
    assert verify_consistency(size1, size2, proof, tree.root(size1), tree.root(size2))


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=2, max_value=200), st.data())
def test_a_tampered_inclusion_proof_is_rejected(size: int, data: st.DataObject) -> None:
    leaves = _leaves(size)
    tree = MerkleTree.from_leaf_hashes(leaves)
    index = data.draw(st.integers(min_value=0, max_value=size - 1))
    proof = tree.inclusion_proof(index, size)
    root = tree.root()
    position = data.draw(st.integers(min_value=0, max_value=len(proof) - 1))
    bit = data.draw(st.integers(min_value=0, max_value=255))
    flipped = bytearray(proof[position])
    flipped[bit // 8] ^= 1 << (bit % 8)
    tampered = [*proof[:position], bytes(flipped), *proof[position + 1 :]]
    assert not verify_inclusion(leaves[index], index, size, tampered, root)
    assert not verify_inclusion(leaves[index], index, size, proof[:-1], root)
    assert not verify_inclusion(leaves[index], index, size, [*proof, root], root)
    other = (index + 1) % size
    assert not verify_inclusion(leaves[index], other, size, proof, root)


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=3, max_value=200), st.data())
def test_a_consistency_proof_does_not_verify_against_a_forked_tree(
    size2: int, data: st.DataObject
) -> None:
    leaves = _leaves(size2)
    tree = MerkleTree.from_leaf_hashes(leaves)
    size1 = data.draw(st.integers(min_value=1, max_value=size2 - 1))
    forked_at = data.draw(st.integers(min_value=0, max_value=size2 - 1))
    forked = MerkleTree.from_leaf_hashes(
        [*leaves[:forked_at], leaf_hash(b"forged"), *leaves[forked_at + 1 :]]
    )
    proof = forked.consistency_proof(size1, size2)
    claimed_old = tree.root(size1)
    consistent = verify_consistency(size1, size2, proof, claimed_old, forked.root(size2))
    assert consistent is (forked_at >= size1)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=40), min_size=1, max_size=6))
def test_appending_one_by_one_and_in_batches_give_the_same_roots(batches: list[int]) -> None:
    total = sum(batches)
    leaves = _leaves(total)
    single, bulk = MerkleTree(), MerkleTree()
    for item in leaves:
        single.append(item)
    offset = 0
    for count in batches:
        assert bulk.append_many(leaves[offset : offset + count]) == offset
        offset += count
    assert bulk.size == single.size == total
    for size in range(total + 1):
        assert bulk.root(size) == single.root(size) == _spec_root(leaves[:size])
    assert root_from_leaves(leaves) == single.root()


def test_append_returns_consecutive_indexes() -> None:
    tree = MerkleTree()
    assert [tree.append(item) for item in _leaves(5)] == [0, 1, 2, 3, 4]
    assert len(tree) == 5


def test_a_leaf_hash_of_the_wrong_length_is_refused() -> None:
    tree = MerkleTree()
    with pytest.raises(MerkleError):
        tree.append(b"short")
    with pytest.raises(MerkleError):
        tree.append_many([*_leaves(2), b"x" * 33])
    with pytest.raises(MerkleError):
        root_from_leaves([b""])
    assert tree.size == 0


def test_a_refused_bulk_load_leaves_the_tree_as_it_was() -> None:
    leaves = _leaves(70_000)
    tree = MerkleTree.from_leaf_hashes(leaves[:5])
    root = tree.root()
    with pytest.raises(MerkleError):
        tree.append_many([*leaves[5:], b"bad"])
    assert tree.size == 5
    assert tree.root() == root
    tree.append_many(leaves[5:])
    assert tree.root() == root_from_leaves(leaves)


def test_sizes_and_indexes_outside_the_tree_are_refused() -> None:
    tree = MerkleTree.from_leaf_hashes(_leaves(4))
    with pytest.raises(MerkleError):
        tree.root(5)
    with pytest.raises(MerkleError):
        tree.inclusion_proof(4, 4)
    with pytest.raises(MerkleError):
        tree.inclusion_proof(0, 5)
    with pytest.raises(MerkleError):
        tree.consistency_proof(3, 5)
    with pytest.raises(MerkleError):
        tree.consistency_proof(3, 2)
    with pytest.raises(MerkleError):
        tree.leaf(-1)


def test_a_consistency_proof_from_the_empty_tree_is_neither_made_nor_accepted() -> None:
    tree = MerkleTree.from_leaf_hashes(_leaves(3))
    with pytest.raises(MerkleError):
        tree.consistency_proof(0, 3)
    assert not verify_consistency(0, 3, [], EMPTY_ROOT, tree.root())
    assert not verify_consistency(0, 0, [], EMPTY_ROOT, EMPTY_ROOT)


def test_equal_sizes_need_an_empty_proof_and_equal_roots() -> None:
    tree = MerkleTree.from_leaf_hashes(_leaves(3))
    assert tree.consistency_proof(3, 3) == []
    assert verify_consistency(3, 3, [], tree.root(), tree.root())
    assert not verify_consistency(3, 3, [tree.root()], tree.root(), tree.root())
    assert not verify_consistency(3, 3, [], tree.root(), tree.root(2))


def test_a_large_tree_answers_for_earlier_sizes() -> None:
    leaves = _leaves(5000)
    tree = MerkleTree.from_leaf_hashes(leaves)
    for size in (1, 2, 3, 1023, 1024, 1025, 4097, 5000):
        root = tree.root(size)
        assert root == root_from_leaves(leaves[:size])
        index = size // 3
        proof = tree.inclusion_proof(index, size)
        assert verify_inclusion(leaves[index], index, size, proof, root)
        proof = tree.consistency_proof(size, 5000)
        assert verify_consistency(size, 5000, proof, root, tree.root())
