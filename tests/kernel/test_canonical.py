from cabincrew.canonical import canonical_hash, canonical_json, sha256_hex


def test_canonical_json_sorts_keys_and_drops_whitespace() -> None:
    assert (
        canonical_json({"b": 1, "a": [1, 2, {"d": None, "c": "x"}]})
        == b'{"a":[1,2,{"c":"x","d":null}],"b":1}'
    )


def test_canonical_json_follows_rfc8785_number_and_unicode_rules() -> None:
    assert (
        canonical_json({"n": 1.0, "e": 1e21, "u": "\u00e9\u2028"})
        == '{"e":1e+21,"n":1,"u":"\u00e9\u2028"}'.encode()
    )


def test_canonical_hash_is_independent_of_key_order() -> None:
    assert canonical_hash({"a": 1, "b": 2}) == canonical_hash({"b": 2, "a": 1})


def test_sha256_hex_of_empty_input_is_the_known_digest() -> None:
    assert sha256_hex(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
