"""The holdout rule on keys alone: never empty, never everything, otherwise the key hash
(the loader on real versions: tests/integration/test_loader.py)."""


from dataprep.loader import held_out


def test_holdout_set_never_empty_nor_everything():
    """A small version with a small fraction still holds out one sample (the eval step needs one)
    and a large fraction still trains on one; otherwise it is exactly the key-hash rule."""
    from dataprep.loader import holdout_set
    keys = [f"k{i}" for i in range(8)]
    tiny, huge = holdout_set(keys, 1e-9), holdout_set(keys, 0.999999)
    from dataprep.loader.splits import _key_hash
    assert tiny == {min(keys, key=_key_hash)} and set(keys) - huge == {max(keys, key=_key_hash)}
    assert holdout_set(keys, 0.5) == {k for k in keys if held_out(k, 0.5)} or \
        not 0 < sum(held_out(k, 0.5) for k in keys) < 8
    assert holdout_set(keys, 0.0) == set() and holdout_set(["only"], 0.5) <= {"only"}
