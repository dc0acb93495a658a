"""The streaming similarity equals the brute-force mean of all pairwise cosines, on several architectures; the
analyze sample read from a token store."""

from __future__ import annotations

import itertools
import os

import pytest
import torch
import torch.multiprocessing as mp

from conftest import make_tiny_model, synthetic_documents, train_stores
from pipeline.analyze import accumulate_unit_sums, language_means
from pipeline.base_model import ffn_modules, load_causal_lm
from pipeline.packing import load_tokenizer
from pipeline.ranks import free_port
from pipeline.similarity import layer_scores, pairwise_similarities
from pipeline.token_blocks import sample_chunks
from reference_data import token_chunks

LANGS = ["en", "el", "hu", "tr"]


def brute_force_pairs(model, tokenizer, docs: dict[str, list[str]], tokens: int, max_length: int,
                      include_special: bool) -> dict[str, list[float]]:
    """Reference: collect every counted token vector (one document at a time), full cosine matrix per pair."""
    vectors = {}
    for lang, texts in docs.items():
        chunks, _ = token_chunks(texts, tokenizer, tokens, max_length, include_special)
        per_layer = [[] for _ in ffn_modules(model)]
        captured = {}
        hooks = [ffn.register_forward_pre_hook(lambda m, a, i=i: captured.__setitem__(i, a[0][0].detach().clone()))
                 for i, ffn in enumerate(ffn_modules(model))]
        with torch.no_grad():
            for c in chunks:
                model(input_ids=torch.tensor([c.input_ids]))
                keep = torch.tensor(c.counted)
                for i in captured:
                    per_layer[i].append(captured[i][keep].double())
        for h in hooks:
            h.remove()
        vectors[lang] = [torch.cat(v) for v in per_layer]
    pairs = {}
    for a, b in itertools.combinations(docs, 2):
        values = []
        for va, vb in zip(vectors[a], vectors[b]):
            cos = torch.nn.functional.normalize(va, dim=-1) @ torch.nn.functional.normalize(vb, dim=-1).T
            values.append(cos.mean().item())
        pairs[f"{a}|{b}"] = values
    return pairs


@pytest.mark.parametrize("model_type", ["llama", "qwen2", "gemma3_text", "mistral"])
@pytest.mark.parametrize("include_special", [False, True])
def test_streaming_equals_brute_force(tmp_path, tokenizer_dir, model_type, include_special):
    path = make_tiny_model(tmp_path / model_type, model_type, tokenizer_dir, seed=1)
    model = load_causal_lm(path)
    tokenizer = load_tokenizer(tokenizer_dir)  # the model dir's config would pick its architecture's tokenizer class
    docs = {lang: synthetic_documents(lang, 30, seed=5) for lang in LANGS}
    means, counts = language_means(model, tokenizer, train_stores(tmp_path, tokenizer_dir, docs),
                                   tokens_per_language=700, max_length=64, batch_size=5,
                                   include_special_tokens=include_special)
    assert counts == {lang: 700 for lang in LANGS}
    streaming = pairwise_similarities(means)
    reference = brute_force_pairs(model, tokenizer, docs, 700, 64, include_special)
    assert streaming.keys() == reference.keys()
    for key in reference:
        diff = max(abs(x - y) for x, y in zip(streaming[key], reference[key]))
        assert diff <= 1e-6, (key, diff)
    # the similarities are not trivially equal across layers or pairs
    assert len({round(v, 4) for vals in streaming.values() for v in vals}) > 5


def sample(tmp_path, model_dir, docs: list[str], tokens: int, max_length: int, include_special: bool):
    """The analyze sample of ``docs`` read from their token store (made with ``model_dir``'s tokenizer)."""
    store = train_stores(tmp_path, model_dir, {"el": docs})["el"]
    return sample_chunks(store, tokens, max_length, include_special, load_tokenizer(model_dir).all_special_ids)


def test_batched_equals_individual(tiny_llama, tmp_path):
    model = load_causal_lm(tiny_llama)
    chunks, n = sample(tmp_path, tiny_llama, synthetic_documents("el", 40, seed=2), 1500, 48, False)
    assert n == 1500
    one = accumulate_unit_sums(model, chunks, batch_size=1, pad_id=3)
    many = accumulate_unit_sums(model, chunks, batch_size=7, pad_id=3)
    torch.testing.assert_close(one, many, atol=1e-9 * n + 1e-6, rtol=1e-6)
    assert one.shape == (3, 32) and one.dtype == torch.float64  # memory is [layers, hidden], whatever n is


def test_padding_never_counts(tiny_llama, tmp_path):
    """A different pad id changes padded positions' hidden states but must not change the sums."""
    model = load_causal_lm(tiny_llama)
    chunks, _ = sample(tmp_path, tiny_llama, synthetic_documents("hu", 20), 800, 40, False)
    a = accumulate_unit_sums(model, chunks, batch_size=8, pad_id=3)
    b = accumulate_unit_sums(model, chunks, batch_size=8, pad_id=57)
    torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_special_tokens_option_and_exact_budget(tiny_llama, tmp_path):
    tokenizer = load_tokenizer(tiny_llama)
    docs = [f"{text} </s> {text[:20]}" if i % 3 == 0 else text  # special tokens in the text
            for i, text in enumerate(synthetic_documents("en", 10))]
    without, n1 = sample(tmp_path, tiny_llama, docs, 10_000, 32, False)
    with_, n2 = sample(tmp_path, tiny_llama, docs, 10_000, 32, True)
    special = set(tokenizer.all_special_ids)
    n_special = sum(t in special for c in with_ for t in c.input_ids.tolist())
    assert n_special > 0 and n2 - n1 == n_special
    assert all(not (t in special and k) for c in without for t, k in zip(c.input_ids.tolist(), c.counted))
    assert all(len(c.input_ids) <= 32 for c in with_)
    _, exact = sample(tmp_path, tiny_llama, docs, 123, 32, False)
    assert exact == 123


def test_fewer_tokens_than_requested_warns(tiny_llama, tmp_path, tokenizer_dir, capsys):
    model, tokenizer = load_causal_lm(tiny_llama), load_tokenizer(tiny_llama)
    stores = train_stores(tmp_path, tokenizer_dir, {"en": synthetic_documents("en", 3)})
    _, counts = language_means(model, tokenizer, stores, 10_000, 64, 4, False)
    assert 0 < counts["en"] < 10_000
    assert f"only {counts['en']:,} tokens available" in capsys.readouterr().err


def test_no_counted_tokens_is_an_error(tiny_llama, tmp_path, tokenizer_dir):
    from pipeline.errors import LayerMoEError

    model, tokenizer = load_causal_lm(tiny_llama), load_tokenizer(tiny_llama)
    stores = train_stores(tmp_path, tokenizer_dir, {"el": ["</s>", "<s> </s>"]})  # special tokens only
    assert stores["el"].num_tokens > 0
    with pytest.raises(LayerMoEError, match="no tokens"):
        language_means(model, tokenizer, stores, 100, 64, 4, False)


def _distributed_worker(rank: int, world: int, port: int, model_dir: str, stores: dict[str, str], out: dict):
    import torch.distributed as dist

    from pipeline.token_store import TokenStore

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
        opened = {lang: TokenStore.open(path) for lang, path in stores.items()}
        means, counts = language_means(model, tokenizer, opened, 600, 48, 4, False)
        out[rank] = (pairwise_similarities(means), counts)
    finally:
        dist.destroy_process_group()


def test_data_parallel_equals_single_process(tiny_llama, tmp_path, tokenizer_dir):
    model, tokenizer = load_causal_lm(tiny_llama), load_tokenizer(tiny_llama)
    stores = train_stores(tmp_path, tokenizer_dir, {lang: synthetic_documents(lang, 25, seed=3) for lang in LANGS})
    means, counts = language_means(model, tokenizer, stores, 600, 48, 4, False)
    single = pairwise_similarities(means)
    with mp.Manager() as manager:
        out = manager.dict()
        paths = {lang: str(store.path) for lang, store in stores.items()}
        mp.spawn(_distributed_worker, args=(2, free_port(), str(tiny_llama), paths, out), nprocs=2, join=True)
        results = dict(out)
    for rank in (0, 1):
        pairs, rank_counts = results[rank]
        assert rank_counts == counts
        for key in single:
            assert max(abs(x - y) for x, y in zip(pairs[key], single[key])) <= 1e-7  # batches differ per rank


def test_layer_scores_aggregations():
    pairs = {"en|el": [0.1, 0.2], "en|hu": [0.3, 0.4], "el|hu": [0.5, 0.7]}
    old, new = ["en"], ["el", "hu"]
    nn, no = [0.5, 0.7], [0.2, 0.3]
    assert layer_scores(pairs, old, new, "new_new") == nn
    assert layer_scores(pairs, old, new, "new_old") == pytest.approx(no)
    assert layer_scores(pairs, old, new, "nn_no_mean") == pytest.approx([(a + b) / 2 for a, b in zip(nn, no)])
    assert layer_scores(pairs, old, new, "all_pairs") == pytest.approx([0.3, 1.3 / 3])
