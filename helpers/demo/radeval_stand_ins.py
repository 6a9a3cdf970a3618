"""RadEval's checkpoints as tiny random-weight stand-ins built offline (`build_radeval_stand_ins`), and the demo's
choice of them (`radeval_cache`); the LLaVA-NeXT and judge stand-ins are helpers.demo.tiny_models'."""
from __future__ import annotations

import json
from pathlib import Path

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers
from transformers import (BertConfig, BertModel, BertTokenizer, DebertaV2Config, DebertaV2ForTokenClassification,
                          DebertaV2Tokenizer, DistilBertConfig, DistilBertModel, DistilBertTokenizer, MPNetConfig,
                          MPNetModel, MPNetTokenizer, RobertaConfig, RobertaModel, RobertaTokenizer)

from .tiny_models import BUILT_NOTE, save_once, tokenizer_corpus
from ..metrics.radeval_compat import CACHE_LAYOUT, import_radeval, model_cache

# The encoders, tiny. Five layers: RadEval's BERTScore keeps the first five (num_layers=5) and asserts they exist.
TINY_ENCODER = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=5, num_attention_heads=2,
                    max_position_embeddings=514)
RATE_NER_LABELS = ["O", *(f"{p}-{t}" for t in ("ABNORMALITY", "NON-ABNORMALITY", "DISEASE", "NON-DISEASE", "ANATOMY")
                          for p in "BI")]  # RaTEScore's entity types (its affinity matrix's keys)
RADGRAPH_LABELS = {"ner_labels": ["", "Anatomy::definitely present", "Observation::definitely present",
                                  "Observation::definitely absent", "Observation::uncertain"],
                   "relation_labels": ["", "located_at", "modify", "suggestive_of"]}  # "": the null label, index 0
STAND_IN_REVISION = "0" * 40  # the commit refs/main names; offline loads never check it


def _snapshot(cache: Path, repo_id: str) -> Path:
    """Where huggingface_hub looks for `repo_id`'s files in the hub cache `cache` (refs/main names the snapshot)."""
    from huggingface_hub.file_download import repo_folder_name

    repo = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(STAND_IN_REVISION)
    return repo / "snapshots" / STAND_IN_REVISION


def _trained(model, texts: list[str], vocab_size: int, specials: list[str], **trainer) -> dict:
    """The `model` section of a tokenizers tokenizer trained on `texts` (its vocabulary, and merges for BPE)."""
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    # each family's own pre-tokenizer (RoBERTa byte-level BPE, DeBERTa-v2 sentencepiece, BERT word pieces)
    pre_tokenizer, kind = {models.BPE: (pre_tokenizers.ByteLevel(), trainers.BpeTrainer),
                           models.Unigram: (pre_tokenizers.Metaspace(), trainers.UnigramTrainer),
                           models.WordPiece: (pre_tokenizers.BertPreTokenizer(), trainers.WordPieceTrainer),
                           }[type(model)]
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.train_from_iterator(texts, kind(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                              **trainer))
    return json.loads(tokenizer.to_str())["model"]


def build_radeval_stand_ins(root: str | Path, texts: list[str], *, vocab_size: int = 400, seed: int = 0) -> Path:
    """Random-weight stand-ins of every checkpoint helpers.metrics.clinical's RadEval metrics load, where RadEval looks for
    them (`model_cache(root)` points it there): a hub cache of `CACHE_LAYOUT["hub"]` with
    bert-base-uncased (CheXbert's backbone config and tokenizer, and the stand-in RadGraph's encoder),
    distilbert-base-uncased (BERTScore), distilroberta-base (ReXrank's and RadCliQ's BERTScore), RaTE-NER-Deberta and
    BioLORD-2023-C (RaTEScore); CheXbert's chexbert.pth and RadGraph's radgraph(-xl).tar.gz in the hub caches RadEval
    gives them. Real architectures (BioLORD is an MPNet), tiny widths, tokenizers trained on `texts`; the RadGraph
    archives hold a DyGIE model built by RadEval's own vendored code. Their scores are meaningless.
    """
    root = Path(root)
    if (root / BUILT_NOTE).is_file():
        return root
    hub = root / CACHE_LAYOUT["hub"]
    wordpiece = _trained(models.WordPiece(unk_token="[UNK]"), texts, vocab_size,
                         ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"])["vocab"]
    bert_tokenizer = BertTokenizer(vocab=wordpiece)

    def encoder(config_class, model_class, tokenizer, **widths):
        config = config_class(vocab_size=len(tokenizer), pad_token_id=tokenizer.pad_token_id, **widths)
        return lambda: (model_class._from_config(config), tokenizer)

    bpe = _trained(models.BPE(), texts, vocab_size, ["<s>", "<pad>", "</s>", "<unk>", "<mask>"],
                   initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    roberta = RobertaTokenizer(vocab=bpe["vocab"], merges=[tuple(m) for m in bpe["merges"]])
    mpnet = MPNetTokenizer(vocab=_trained(models.WordPiece(unk_token="[UNK]"), texts, vocab_size,
                                          ["<s>", "<pad>", "</s>", "[UNK]", "<mask>"])["vocab"])
    unigram = _trained(models.Unigram(), texts, vocab_size, ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
                       unk_token="[UNK]")
    deberta = DebertaV2Tokenizer(vocab=[tuple(piece) for piece in unigram["vocab"]])
    distilbert = DistilBertTokenizer(vocab=wordpiece)
    for tokenizer in (bert_tokenizer, roberta, mpnet, deberta, distilbert):
        tokenizer.model_max_length = 512  # as the real ones: BERTScore truncates to it
    ner = DebertaV2Config(vocab_size=len(deberta), pad_token_id=deberta.pad_token_id, **TINY_ENCODER,
                          id2label=dict(enumerate(RATE_NER_LABELS)))
    builds = {"bert-base-uncased": encoder(BertConfig, BertModel, bert_tokenizer, **TINY_ENCODER),
              "distilbert-base-uncased": encoder(DistilBertConfig, DistilBertModel, distilbert,
                                                 dim=32, hidden_dim=64, n_layers=5, n_heads=2),
              "distilroberta-base": encoder(RobertaConfig, RobertaModel, roberta, **TINY_ENCODER),
              "FremyCompany/BioLORD-2023-C": encoder(MPNetConfig, MPNetModel, mpnet, **TINY_ENCODER),
              "Angelakeke/RaTE-NER-Deberta": lambda: (DebertaV2ForTokenClassification._from_config(ner), deberta)}
    for repo_id, build in builds.items():
        save_once(_snapshot(hub, repo_id), build, seed, "cpu")
    _save_chexbert(root, seed)
    with model_cache(root):  # the RadGraph stand-in's encoder is the bert-base-uncased just saved
        for model_type in ("radgraph", "radgraph-xl"):
            _save_radgraph(root, model_type, seed)
    (root / BUILT_NOTE).write_text(json.dumps(
        {"note": "random weights, built offline by helpers.demo.radeval_stand_ins; RadEval's scores on them are meaningless",
         "seed": seed, "checkpoints": [*builds, "chexbert.pth", "radgraph.tar.gz", "radgraph-xl.tar.gz"]}, indent=2))
    return root


def _save_chexbert(root: Path, seed: int) -> None:
    """chexbert.pth as RadEval's CheXbert labeller loads it: a `model_state_dict` of the bert-base-uncased backbone and
    13 four-way heads plus a two-way one, keys prefixed with `module.` (it was saved from DataParallel)."""
    torch.manual_seed(seed)
    config = BertConfig.from_pretrained(_snapshot(root / CACHE_LAYOUT["hub"], "bert-base-uncased"))
    bert, hidden = BertModel(config), config.hidden_size
    heads = torch.nn.ModuleList([torch.nn.Linear(hidden, 4) for _ in range(13)] + [torch.nn.Linear(hidden, 2)])
    state = {**{f"module.bert.{k}": v for k, v in bert.state_dict().items()},
             **{f"module.linear_heads.{k}": v for k, v in heads.state_dict().items()}}
    out = _snapshot(root / CACHE_LAYOUT["chexbert"], "StanfordAIMI/RRG_scorers")
    out.mkdir(parents=True, exist_ok=True)
    torch.save({"model_state_dict": state}, out / "chexbert.pth")


def _save_radgraph(root: Path, model_type: str, seed: int) -> None:
    """`<model_type>.tar.gz` as RadEval's vendored RadGraph unpacks it: config.json, vocabulary/ and weights.th of a
    DyGIE model (NER and relations, no coreference or events) over the stand-in bert-base-uncased."""
    import tarfile
    import tempfile

    allennlp = "radeval.metrics.radgraph._vendor.allennlp"
    vocabulary, text_embedders, token_embedders, dygie = (
        import_radeval(name) for name in (f"{allennlp}.data", f"{allennlp}.modules.text_field_embedders",
                                                   f"{allennlp}.modules.token_embedders",
                                                   "radeval.metrics.radgraph._vendor.dygie.models.dygie"))
    bert = {"type": "pretrained_transformer_mismatched", "model_name": "bert-base-uncased", "max_length": 512}
    model = {"feature_size": 8, "max_span_width": 4, "target_task": "relation",
             "feedforward_params": {"num_layers": 1, "hidden_dims": 16, "dropout": 0.0},
             "loss_weights": {"ner": 1.0, "relation": 1.0, "coref": 0.0, "events": 0.0},
             "modules": {"ner": {}, "relation": {"spans_per_word": 0.5},
                         "coref": {"spans_per_word": 0.3, "max_antecedents": 10, "coref_prop": 0},
                         "events": {"trigger_spans_per_word": 0.3, "argument_spans_per_word": 0.8,
                                    "loss_weights": {"trigger": 1.0, "arguments": 0.5}}}}
    config = {"dataset_reader": {"type": "dygie", "max_span_width": model["max_span_width"],
                                 "token_indexers": {"bert": bert}},
              "model": {"type": "dygie", "initializer": {}, "module_initializer": {},
                        "embedder": {"token_embedders": {"bert": bert}},
                        **model}}
    # RadEval's preprocessing names each document's dataset after the model type: the label namespaces follow it
    vocab = vocabulary.Vocabulary(tokens_to_add={f"{model_type}__{k}": v for k, v in RADGRAPH_LABELS.items()})
    torch.manual_seed(seed)
    embedder = text_embedders.BasicTextFieldEmbedder(
        {"bert": token_embedders.PretrainedTransformerMismatchedEmbedder(bert["model_name"], bert["max_length"])})
    network = dygie.DyGIE(vocab=vocab, embedder=embedder, **json.loads(json.dumps(model)))  # it pops what it reads
    out = _snapshot(root / CACHE_LAYOUT["radgraph"], "StanfordAIMI/RRG_scorers")
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as work:
        (Path(work) / "config.json").write_text(json.dumps(config))
        vocab.save_to_files(str(Path(work) / "vocabulary"))
        torch.save(network.state_dict(), Path(work) / "weights.th")
        with tarfile.open(out / f"{model_type}.tar.gz", "w:gz") as tar:
            for name in ("config.json", "vocabulary", "weights.th"):
                tar.add(Path(work) / name, arcname=name)


def radeval_cache(settings, artifacts, studies) -> Path | None:
    """In the demo, the RadEval stand-ins (built once in models/radeval), for `clinical.evaluate(stand_ins=...)`;
    else None: RadEval fetches the real checkpoints from the hub."""
    if settings.offline:
        return build_radeval_stand_ins(artifacts.models_dir / "radeval", tokenizer_corpus(studies))
    return None
