"""Write a ready Triton model repository for your own checkpoints.

  python build_scripts/configure_repository.py --llm DIR --ssm DIR [--ssm DIR ...] \
      --expansion 1,1,3,1,1,1,1,1 --output DIR

The LLM (a folder with tokenizer.json, or a .gguf file) brings the tokenizer pre/postprocessing use. Paths are written
absolute, so the repository can be served from anywhere on this machine.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from specinfer import TreeConfig
from specinfer.config import ATTENTION, SSM_ENGINES, VERIFIERS, SuffixConfig, parse_expansion, parse_proposers
from specinfer.model.checkpoint import read_model_args
from specinfer.model.gguf import is_gguf
from specinfer.model.offload import OFFLOAD
from specinfer.parallel.shard import check_size
from specinfer.proposers import DraftHead
from specinfer.serving.repository import RepositoryOptions, write_repository
from specinfer.serving.requests import Limits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llm", required=True, help="Llama checkpoint: a Hugging Face folder with tokenizer.json, or a .gguf file")
    ap.add_argument("--ssm", action="append", default=[], help="SSM checkpoint folder (repeat to merge several)")
    ap.add_argument("--expansion", default="1,1,3,1,1,1,1,1", help="tree expansion <k1,...,km>")
    ap.add_argument("--output", required=True, help="folder to write the repository into")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="auto: bfloat16 on CUDA and on CPUs with AVX-512 BF16 or AMX, float32 elsewhere (decided at load)")
    ap.add_argument("--max-batch-size", type=int, default=16, help="concurrent requests per model; more wait")
    ap.add_argument("--max-context", type=int, default=0, help="tokens per request (0: the LLM's maximum)")
    ap.add_argument("--draft-sampling", default="with_replacement", choices=["with_replacement", "without_replacement"])
    ap.add_argument("--verifier", default="gumbel", choices=VERIFIERS,
                    help="sampled requests: gumbel (a seed fixes the text at any load, with or without speculation), "
                         "mss (multi-step speculative sampling) or naive")
    ap.add_argument("--adaptive", action=argparse.BooleanOptionalAction, default=True,
                    help="adaptive trees: the expansion is the largest tree, each step drafts and verifies what pays off")
    ap.add_argument("--bls-name", default="specinfer_bls",
                    help="name of the BLS model (tensorrt_llm_bls is the name TensorRT-LLM's clients know)")
    ap.add_argument("--ensemble-name", default="specinfer",
                    help="name of the speculative ensemble (ensemble is the name TensorRT-LLM's clients and docs use)")
    ap.add_argument("--unary-name", default="specinfer_unary",
                    help="name of the non-decoupled BLS model, for plain infer() and perf_analyzer without --streaming")
    limits = Limits()
    ap.add_argument("--max-prompt-bytes", type=int, default=limits.max_prompt_bytes, help="larger text_input: 400")
    ap.add_argument("--max-stop-words", type=int, default=limits.max_stop_words, help="more stop_words: 400")
    ap.add_argument("--max-stop-word-bytes", type=int, default=limits.max_stop_word_bytes, help="a longer stop word: 400")
    ap.add_argument("--attention", choices=ATTENTION,
                    help="tree attention: triton (the kernel) or sdpa; default: triton on CUDA, sdpa on CPU")
    ap.add_argument("--tensor-parallel", type=int, default=1, metavar="N",
                    help="shard each decoding model's LLM over N processes (GPUs device, device+1, ... on CUDA)")
    ap.add_argument("--cuda-graphs", action=argparse.BooleanOptionalAction, default=None,
                    help="replay the models' forwards as CUDA graphs (with triton attention); default: on with CUDA, "
                         "unless the draft head proposes")
    ap.add_argument("--ssm-engine", default="torch", choices=SSM_ENGINES,
                    help="what runs the SSMs: PyTorch, or their ONNX graph under onnxruntime or tensorrt")
    ap.add_argument("--offload", default="none", choices=OFFLOAD,
                    help="cpu: keep the LLM's decoder layers in host memory, streamed to the device every forward")
    ap.add_argument("--proposers", help="where draft nodes come from: suffix (text already seen, no model), ssm, "
                                         "head (the draft head on the LLM's hidden state; needs --head), or several "
                                         "(merged); default: suffix, and ssm with --ssm, head with --head")
    ap.add_argument("--head", help="the draft head's folder (build_scripts/make_draft_head.py trains one)")
    ap.add_argument("--head-expansion", default=",".join(map(str, RepositoryOptions.head_expansion)),
                    help="the head's tree: children per node at each level")
    ap.add_argument("--suffix-global-tokens", type=int, default=RepositoryOptions.suffix_global_tokens,
                    help="earlier requests' output tokens the suffix proposer keeps for all requests (0: none)")
    ap.add_argument("--max-speculative-batch", type=int, default=RepositoryOptions.max_speculative_batch,
                    help="steps whose batch has more requests decode plainly (0: any batch speculates)")
    args = ap.parse_args()
    expansion = parse_expansion(args.expansion)
    try:  # fail here, not at server start
        head_expansion = parse_expansion(args.head_expansion)
        proposers = (parse_proposers(args.proposers) if args.proposers is not None
                     else ("suffix",) + (("ssm",) if args.ssm else ()) + (("head",) if args.head else ()))
        TreeConfig(expansion=expansion, proposers=proposers, max_speculative_batch=args.max_speculative_batch,
                   head_expansion=head_expansion,
                   suffix=SuffixConfig(global_tokens=args.suffix_global_tokens)).check_size(max(1, len(args.ssm)))
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if "head" in proposers and args.head is None:
        raise SystemExit("error: the proposer 'head' needs --head (a draft head trained for this LLM)")
    if "head" in proposers and (args.tensor_parallel > 1 or args.cuda_graphs):
        raise SystemExit("error: the proposer 'head' reads the LLM's hidden states: not with --tensor-parallel or --cuda-graphs")
    if args.cuda_graphs and args.device == "cpu":
        raise SystemExit("error: --cuda-graphs needs --device cuda")
    llm = Path(args.llm).resolve()
    llm_args = read_model_args(llm)
    vocab = llm_args.vocab_size
    try:
        check_size(llm_args, args.tensor_parallel)
        if "head" in proposers:
            DraftHead.read_config(args.head, llm_args.hidden_size)
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None
    if not is_gguf(llm) and not (llm / "tokenizer.json").is_file():
        raise SystemExit(f"error: {llm} has no tokenizer.json")
    for ssm in args.ssm:
        if read_model_args(ssm).vocab_size != vocab:
            raise SystemExit(f"error: {ssm} has another vocabulary size than the LLM ({vocab})")
    opts = RepositoryOptions(
        llm=str(llm), ssms=tuple(str(Path(s).resolve()) for s in args.ssm), expansion=expansion,
        device=args.device, dtype=args.dtype, max_batch_size=args.max_batch_size, max_context=args.max_context or None,
        draft_sampling=args.draft_sampling, verifier=args.verifier, adaptive=args.adaptive, bls_name=args.bls_name,
        ensemble_name=args.ensemble_name, unary_name=args.unary_name, attention=args.attention,
        tensor_parallel_size=args.tensor_parallel, cuda_graphs=args.cuda_graphs, ssm_engine=args.ssm_engine,
        offload=args.offload,
        proposers=proposers, suffix_global_tokens=args.suffix_global_tokens,
        head=str(Path(args.head).resolve()) if args.head else None, head_expansion=head_expansion,
        max_speculative_batch=args.max_speculative_batch,
        limits=Limits(args.max_prompt_bytes, args.max_stop_words, args.max_stop_word_bytes),
    )
    out = write_repository(args.output, opts)
    print(f"wrote a model repository to {out}: models {args.ensemble_name}, incremental (ensembles), {args.bls_name} (BLS), "
          f"{args.unary_name} (BLS, not decoupled), "
          "preprocessing, specinfer_llm, incremental_llm, postprocessing")


if __name__ == "__main__":
    main()
