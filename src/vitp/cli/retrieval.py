"""`vitp features`, `vitp index build|info`, `vitp search`, `vitp evaluate`: the retrieval stage.

The seed's flags work as they did (`--image_dir --output --vit_checkpoint`; `--query_features
--gallery_features --top_k`), and the seed's output lines are printed, each with an English form.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from vitp.cli.types import (
    byte_size, faiss_device_option, json_object, int_at_least, non_negative_float, non_negative_int, positive_float, positive_int, progress_option,
    vit_options,
)
from vitp.options import BACKENDS, POOLS, STORE_DTYPES


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add this stage's subcommands."""
    _register_features(subparsers)
    _register_index(subparsers)
    _register_search(subparsers)
    _register_evaluate(subparsers)


# --------------------------------------------------------------------------------------------------
# Shared flags


def _add_search_parameter_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--nprobe", type=positive_int, help="IVF indexes: inverted lists visited per query (FAISS default 1)")
    parser.add_argument("--ef_search", type=positive_int, help="HNSW indexes: search breadth efSearch (FAISS default 16)")


def _add_query_expansion_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--qe", type=non_negative_int, default=0, metavar="K",
                        help="query expansion: search again with the query plus its top K results (0 = off)")
    parser.add_argument("--qe_alpha", type=non_negative_float, default=0.0,
                        help="QE weights: result i weighs max(score_i, 0)**alpha; 0 = average QE, 3 = a usual alpha-QE")


def _add_gallery_postprocessing_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--factory", default="Flat",
                        help="FAISS index-factory string: Flat (exact, default), IVF1024,Flat, HNSW32, IVF4096,PQ64, ...")
    parser.add_argument("--pca", type=positive_int, metavar="DIMS", help="reduce features to DIMS dimensions by PCA")
    parser.add_argument("--whiten", action="store_true", help="whiten the PCA components (needs --pca)")
    parser.add_argument("--pca_fit", metavar="FEATURES.npz",
                        help="learn PCA on these features instead of the gallery (same model and settings)")
    parser.add_argument("--dba", type=non_negative_int, default=0, metavar="K",
                        help="database-side augmentation: each gallery vector plus its K nearest gallery neighbours (0 = off)")
    parser.add_argument("--dba_alpha", type=non_negative_float, default=0.0,
                        help="DBA weights: neighbour i weighs max(score_i, 0)**alpha; 0 = plain average")


def _search_parameters(args: argparse.Namespace) -> dict:
    parameters = {}
    if args.nprobe is not None:
        parameters["nprobe"] = args.nprobe
    if args.ef_search is not None:
        parameters["efSearch"] = args.ef_search
    return parameters


def _progress(args: argparse.Namespace) -> bool:
    return not args.no_progress


# --------------------------------------------------------------------------------------------------
# vitp features


def _register_features(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "features", parents=[vit_options(), progress_option()],
        help="extract ViT features of a folder of images into an .npz or an embedding store",
        description=(
            "Embed every image under --image_dir (recursively: .jpg .jpeg .png .tif .tiff .bmp .webp) with the ViT: "
            "InternVL preprocessing (bicubic resize to the model's size, ImageNet mean/std), the --select_layer "
            "tokens pooled (--pool) and L2-normalised. --output NAME.npz writes the seed's .npz (features, "
            "image_paths) plus labels (parent folder name) and the settings used; any other name writes an embedding "
            "store folder (embeddings/*.npy + metadata/*.parquet, shard by shard) for galleries larger than memory. "
            "Unreadable files are skipped and listed in <output>.skipped.txt. Killed runs continue where they stopped "
            "when the same command is run again. Under torchrun (--nproc_per_node N, --nnodes M) the ranks split the "
            "sorted file list, one GPU each (or one CPU process each), and the output is the same as one process's."
        ),
    )
    parser.add_argument("--image_dir", required=True, help="folder of images (class = parent folder name)")
    parser.add_argument("--output", required=True,
                        help="NAME.npz: one features file; any other name: an embedding store folder")
    parser.add_argument("--vit_checkpoint", required=True, help="ViT weights: any format `vitp convert-vit` reads")
    parser.add_argument("--vit_config", help="preset name or JSON config, for weights saved without one")
    parser.add_argument("--num_heads", type=positive_int, help="override the number of attention heads of --vit_config")
    parser.add_argument("--image_size", type=positive_int, help="input size (default: the model's; position embedding resampled)")
    parser.add_argument("--select_layer", type=int, default=-1,
                        help="layer whose tokens are pooled, InternVL indexing: -1 last, 0 embeddings (default: %(default)s)")
    parser.add_argument("--pool", choices=POOLS, default="mean",
                        help="mean over patch tokens, or the CLS token (default: %(default)s)")
    parser.add_argument("--shard_size", type=positive_int, default=2048,
                        help="images per resume shard (default: %(default)s); a shard is also written every --shard_seconds")
    parser.add_argument("--shard_seconds", type=positive_float, default=300.0, help="(default: %(default)s)")
    parser.add_argument("--store_dtype", choices=STORE_DTYPES, default="float32",
                        help="embedding store: precision of the stored vectors (default: %(default)s)")
    parser.add_argument("--store_shard_size", type=positive_int, default=100_000,
                        help="embedding store: images of the sorted list per .npy/.parquet pair (default: %(default)s)")
    parser.add_argument("--max_pixels", type=positive_int, help="skip images with more pixels (default: Pillow's bomb limit)")
    parser.add_argument("--restart", action="store_true", help="discard the shards of an unfinished earlier run")
    parser.set_defaults(handler=_run_features)


def _run_features(args: argparse.Namespace) -> int:
    from vitp.data.images import DEFAULT_MAX_PIXELS
    from vitp.model.vit_checkpoint import config_from_argument
    from vitp.retrieval.embedding_store import is_store_path
    from vitp.retrieval.extract import extract_features
    from vitp.errors import RetrievalError
    from vitp.retrieval.extract.store import UnusablePartialRun, check_store_output, partial_directory
    from vitp.files import check_output_path

    output = Path(args.output)
    # Before the model is loaded and any image embedded.
    check_store_output(output) if is_store_path(output) else check_output_path(output)
    config = None
    if args.vit_config:
        config = config_from_argument(args.vit_config, **({"num_heads": args.num_heads} if args.num_heads else {}))
    try:
        result = extract_features(
            args.image_dir, output, args.vit_checkpoint,
            vit_config=config, image_size=args.image_size, select_layer=args.select_layer, pool=args.pool,
            batch_size=args.batch_size, num_workers=args.num_workers, device=args.device, dtype=args.dtype,
            shard_size=args.shard_size, shard_seconds=args.shard_seconds, store_dtype=args.store_dtype,
            store_shard_size=args.store_shard_size,
            max_pixels=DEFAULT_MAX_PIXELS if args.max_pixels is None else args.max_pixels, restart=args.restart, progress_bar=_progress(args),
        )
    except UnusablePartialRun as err:
        raise RetrievalError(f"{err} with --restart") from err
    except KeyboardInterrupt:
        print(f"\ninterrupted: finished batches are kept in {partial_directory(output)}; "
              f"run the same command again to continue", file=sys.stderr)
        return 130
    if not result.world.is_main:
        return 0  # rank 0 reports for every rank
    settings = result.settings
    print(f"找到 {result.num_found} 张图像 (found {result.num_found} images under {args.image_dir})")
    if result.world.size > 1:
        print(f"{result.world.size} processes (torchrun ranks) shared the work")
    if result.num_reused:
        print(f"continued an unfinished run: {result.num_reused} images were already done")
    print(f"model {settings['vit_checkpoint']} ({settings['model_fingerprint'][:19]}), layer {settings['layer']}, "
          f"pool {settings['pool']}, {settings['image_size']} px, {settings['dtype']} on {settings['device']}")
    if result.skipped:
        print(f"skipped {len(result.skipped)} unreadable files (listed in {result.skipped_report}):")
        for path, reason in result.skipped[:10]:
            print(f"  {path}: {reason}")
        if len(result.skipped) > 10:
            print(f"  ... {len(result.skipped) - 10} more")
    computed = result.num_found - result.num_reused - len(result.skipped)
    kind = "embedding store" if is_store_path(output) else "features"
    print(f"特征已保存到 {result.output} ({kind} saved to {result.output})")
    classes = sorted(set(map(str, result.feature_set.labels))) if result.feature_set is not None else None
    if classes is not None and len(classes) < 2:
        print(f"note: one class only ({', '.join(map(repr, classes))}; an image's class is its folder's name): fine "
              f"for a gallery to search, but `vitp evaluate` needs at least 2 classes, one folder of images each "
              f"under --image_dir")
    print(f"特征形状: {result.shape} (feature shape; {result.seconds:.1f} s, "
          f"{max(computed, 0) / max(result.seconds, 1e-9):.1f} images/s)")
    return 0


# --------------------------------------------------------------------------------------------------
# vitp index build | info


def _register_index(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("index", help="build or describe an index of gallery features (FAISS or Milvus)")
    actions = parser.add_subparsers(dest="index_command", required=True, metavar="ACTION")

    build = actions.add_parser(
        "build", parents=[faiss_device_option(), progress_option()],
        help="build an index from a features file or an embedding store",
        description=(
            "Index gallery features (an .npz, or an embedding store folder read in chunks) for inner-product search "
            "(cosine similarity on L2-normalised features) and save the index as a directory with the gallery's "
            "paths, labels, feature settings and post-processing. --backend faiss (default) builds a FAISS index: "
            "exact by default, any --factory, or, with --max_index_memory, the index autofaiss's rule chooses for "
            "that budget, trained on a sample, filled chunk by chunk and tuned to --max_query_ms. --backend milvus "
            "puts the gallery into a Milvus collection (Milvus Lite in a local file by default, or a Milvus server). "
            "Searching either with features of another model, layer, pooling or image size is refused."
        ),
    )
    build.add_argument("--features", required=True, help="gallery features: .npz or embedding store from `vitp features`")
    build.add_argument("--output", required=True, help="index directory to write")
    _add_gallery_postprocessing_flags(build)
    build.add_argument("--max_index_memory", type=byte_size, metavar="SIZE",
                       help="FAISS: choose the index that fits in SIZE (4GB, 512MB, ...; powers of 1024), as autofaiss "
                            "does: Flat, HNSW, IVF,Flat or OPQ,IVF,PQ; recall@10 against exact search is reported")
    build.add_argument("--max_query_ms", type=positive_float,
                       help="FAISS: tune nprobe / efSearch to the largest value whose search takes at most this many "
                            "milliseconds per query (default with --max_index_memory: 10)")
    build.add_argument("--backend", choices=BACKENDS, default="faiss", help="vector engine (default: %(default)s)")
    build.add_argument("--milvus_uri",
                       help="Milvus: a local .db file (Milvus Lite, embedded; default OUTPUT/milvus.db) or a server, "
                            "http://host:19530 (token, if any, from the MILVUS_TOKEN environment variable)")
    build.add_argument("--milvus_collection", help="Milvus: collection name (default: vitp_ + the output's name)")
    build.add_argument("--milvus_index", default="FLAT",
                       help="Milvus: index type, FLAT (exact, default), IVF_FLAT, IVF_SQ8, IVF_PQ, HNSW, DISKANN, AUTOINDEX")
    build.add_argument("--milvus_index_params", type=json_object, default={}, metavar="JSON",
                       help='Milvus: index parameters, e.g. \'{"nlist": 1024}\' or \'{"M": 16, "efConstruction": 200}\'')
    _add_search_parameter_flags(build)
    build.set_defaults(handler=_run_index_build)

    info = actions.add_parser("info", help="describe a saved index")
    info.add_argument("index", help="index directory")
    info.set_defaults(handler=_run_index_info)


def _run_index_build(args: argparse.Namespace) -> int:
    from vitp.errors import ConfigError
    from vitp.retrieval.embedding_store import load_feature_set, open_gallery
    from vitp.retrieval.index import RetrievalIndex, check_index_output

    check_index_output(args.output)  # before the (possibly long) build
    search_parameters = _search_parameters(args)
    if args.max_index_memory is not None and args.factory != "Flat":
        raise ConfigError("--max_index_memory chooses the index type itself: leave out --factory")
    gallery = open_gallery(args.features)
    options = dict(search_parameters=search_parameters, progress_bar=_progress(args))
    if args.backend == "milvus":
        from vitp.retrieval.backends.milvus import default_collection_name
        from vitp.retrieval.index import MILVUS_LITE_FILE

        faiss_only = [flag for flag, value in (("--factory", args.factory != "Flat"), ("--pca", args.pca is not None),
                                               ("--whiten", args.whiten), ("--dba", args.dba), ("--pca_fit", args.pca_fit),
                                               ("--max_index_memory", args.max_index_memory),
                                               ("--max_query_ms", args.max_query_ms)) if value]
        if faiss_only:
            raise ConfigError(f"{', '.join(faiss_only)}: FAISS only; a Milvus collection holds the features as they are "
                            f"(choose its index with --milvus_index)")
        uri = args.milvus_uri or str(Path(args.output) / MILVUS_LITE_FILE)
        index = RetrievalIndex.build(
            gallery, backend="milvus", uri=uri, collection=args.milvus_collection or default_collection_name(args.output),
            index_type=args.milvus_index, index_params=args.milvus_index_params, **options,
        )
    else:
        if args.milvus_uri or args.milvus_collection or args.milvus_index != "FLAT" or args.milvus_index_params:
            raise ConfigError("--milvus_* flags need --backend milvus")
        index = RetrievalIndex.build(
            gallery, args.factory, pca_dimensions=args.pca, whiten=args.whiten,
            pca_fit=load_feature_set(args.pca_fit) if args.pca_fit else None, dba_k=args.dba, dba_alpha=args.dba_alpha,
            faiss_device=args.faiss_device, max_index_memory=args.max_index_memory, max_query_ms=args.max_query_ms,
            measure_recall=args.factory != "Flat", **options,
        )
    path = index.save(args.output)
    print(f"built {index.describe()}")
    for line in _tuning_lines(index.meta.get("tuning")):
        print(line)
    extra = " (with exact vectors for re-ranking)" if index.meta.get("stores_vectors") else ""
    print(f"saved {path}{extra}")
    return 0


def _tuning_lines(tuning: dict | None) -> list[str]:
    if not tuning:
        return []
    lines = []
    if "tuned" in tuning:
        lines.append(f"tuned {tuning['tuned']} to a query time under {tuning['max_query_ms']:g} ms")
    recall = next(((key, value) for key, value in tuning.items() if key.startswith("recall_at_")), None)
    if recall:
        lines.append(f"recall@{recall[0].rsplit('_', 1)[1]} against exact search: {recall[1]:.4f} "
                     f"({tuning['held_out_queries']} held-out gallery vectors as queries; {tuning['ms_per_query']:.3f} ms per query)")
    return lines


def _run_index_info(args: argparse.Namespace) -> int:
    import json

    from vitp.retrieval.index import RetrievalIndex

    index = RetrievalIndex.load(args.index, faiss_device="cpu")
    settings = index.feature_settings or {}
    print(index.describe())
    print(f"classes: {len(set(map(str, index.labels)))}, images: {len(index)}")
    print(f"features: {index.meta['features_file']}")
    for line in _tuning_lines(index.meta.get("tuning")):
        print(line)
    keys = ("vit_checkpoint", "model_fingerprint", "layer", "pool", "image_size", "dtype")
    print(json.dumps({key: settings.get(key) for key in keys}, indent=2))
    return 0


# --------------------------------------------------------------------------------------------------
# vitp search


def _register_search(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "search", parents=[vit_options(dtype_default=None), faiss_device_option(), progress_option()],
        help="top-K gallery images for query images",
        description=(
            "Embed query images (a file, or every image under a folder) with the model recorded in the index, or read "
            "query features, and print the top-K gallery paths, labels and scores; write them with --output "
            "(.json or .csv, repeatable) and draw them with --contact_sheet."
        ),
    )
    parser.add_argument("--index", required=True, help="index directory from `vitp index build` (FAISS or Milvus)")
    queries = parser.add_mutually_exclusive_group(required=True)
    queries.add_argument("--image", help="query image file or folder")
    queries.add_argument("--query_features", help="query features (.npz or embedding store) instead of images")
    parser.add_argument("-k", "--top_k", type=positive_int, default=5, dest="k", help="results per query (default: %(default)s)")
    _add_query_expansion_flags(parser)
    _add_search_parameter_flags(parser)
    parser.add_argument("--output", action="append", default=[], metavar="FILE",
                        help="write results to FILE.json or FILE.csv (repeatable)")
    parser.add_argument("--contact_sheet", metavar="IMAGE",
                        help="draw queries and their results into this picture (.png, .jpg, .webp: by its extension)")
    parser.add_argument("--show", type=int_at_least(0, "0 prints no query"), default=20,
                        help="queries printed and drawn (default: %(default)s)")
    parser.add_argument("--vit_checkpoint", help="the gallery's ViT checkpoint, if it moved since the index was built")
    parser.set_defaults(handler=_run_search)


def _run_search(args: argparse.Namespace) -> int:
    from vitp.errors import ConfigError, RetrievalError, WeightFormatError
    from vitp.retrieval.embedding_store import load_feature_set
    from vitp.retrieval.index import RetrievalIndex
    from vitp.retrieval.pictures import picture_format
    from vitp.retrieval.search import embed_queries, output_format, search_index
    from vitp.files import check_output_path

    # Refuse bad flags before the index is loaded and any query embedded.
    search_parameters = _search_parameters(args)
    for output in args.output:
        output_format(output)
        check_output_path(output)
    if args.contact_sheet:
        if args.show < 1:
            raise ConfigError(f"--show {args.show}: the contact sheet draws the first --show queries, so it must be >= 1")
        check_output_path(args.contact_sheet, "--contact_sheet")
        picture_format(args.contact_sheet, "--contact_sheet")
    index = RetrievalIndex.load(args.index, faiss_device=args.faiss_device)
    skipped = []
    if args.image:
        try:
            queries, skipped = embed_queries(
                index, args.image, vit_checkpoint=args.vit_checkpoint, device=args.device, dtype=args.dtype,
                batch_size=args.batch_size, num_workers=args.num_workers, progress_bar=_progress(args),
            )
        except WeightFormatError as err:
            if not args.vit_checkpoint:
                raise
            raise RetrievalError(_not_the_index_model(args.vit_checkpoint, index.feature_settings)) from err
        if queries is None:
            raise RetrievalError(f"--image {args.image}: no query image could be read: "
                              + "; ".join(f"{p}: {r}" for p, r in skipped[:3]))
    else:
        queries = load_feature_set(args.query_features)
    results = search_index(index, queries, args.k, qe_k=args.qe, qe_alpha=args.qe_alpha,
                           search_parameters=search_parameters, skipped=skipped)
    print("\n".join(results.lines(args.show, written=bool(args.output))))
    if args.k > len(index):
        print(f"-k {args.k}: the gallery has {len(index)} images, so each query got at most {len(index)} results")
    for path, reason in skipped:
        print(f"skipped query {path}: {reason}")
    for output in args.output:
        print(f"wrote {results.write(output)}")
    if args.contact_sheet:
        print(f"wrote {results.contact_sheet(args.contact_sheet, args.show)}")
    return 0


def _not_the_index_model(checkpoint: str, settings: dict) -> str:
    """Why a --vit_checkpoint of another network cannot embed the queries: the index's model, in two lines."""
    config = settings.get("model_config") or {}
    shape = ", ".join(f"{name} {config[key]}" for name, key in (("layers", "num_layers"), ("hidden", "hidden_size"),
                                                               ("patch", "patch_size"), ("image", "image_size"))
                      if key in config)
    return (f"--vit_checkpoint {checkpoint}: this checkpoint is not the index's model (InternViT, {shape})\n"
            f"  the gallery was embedded with {settings.get('vit_checkpoint')}: give that checkpoint (where it is now)")


# --------------------------------------------------------------------------------------------------
# vitp evaluate


DENSE_TASKS = ("segmentation", "change_detection")  # vitp.downstream.metrics.TASKS, written out: no torch import
COMPARE_RESAMPLES = 1000  # bootstrap resamples of --compare when --bootstrap is not given


def _register_evaluate(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "evaluate", parents=[faiss_device_option(), progress_option()],
        help="Top-K accuracy, precision@K and mAP of query features against a gallery; compare two evaluations",
        description=(
            "Search every query in the gallery and report the seed's Top-K accuracy lines (a hit if any of the top K "
            "shares the query's class), precision@K, mAP@K, full-ranking mAP, their class-balanced form (the mean over "
            "classes of each class's value) and a per-class table. Queries whose class has no image in the gallery are "
            "listed and left out of the metrics. --bootstrap N adds 95%% intervals (percentile bootstrap over queries; "
            "class-balanced and per class: resampled within each class). --compare A.json B.json reads two --output "
            "files of the same queries and gives paired-bootstrap intervals of A - B."
        ),
    )
    parser.add_argument("--query_features", help="query features (.npz); omit with --leave_one_out to use the gallery")
    gallery = parser.add_mutually_exclusive_group()
    gallery.add_argument("--gallery_features", help="gallery features (.npz)")
    gallery.add_argument("--index", help="a built index instead of gallery features")
    parser.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"),
                        help="instead of evaluating: paired differences A - B of two --output files of the same queries")
    parser.add_argument("--top_k", type=positive_int, nargs="+", default=[1, 3, 5], help="K values (default: 1 3 5)")
    parser.add_argument("--leave_one_out", action="store_true",
                        help="queries are (part of) the gallery: each query's own image is removed from its results")
    _add_gallery_postprocessing_flags(parser)
    _add_query_expansion_flags(parser)
    _add_search_parameter_flags(parser)
    parser.add_argument("--no_full_map", action="store_true",
                        help="skip mAP over the full gallery ranking (the costly part on huge galleries)")
    parser.add_argument("--bootstrap", type=positive_int, metavar="N",
                        help=f"95%% intervals from N bootstrap resamples of the queries (with --compare default: "
                             f"{COMPARE_RESAMPLES}; 1000 is usual)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap resamples (default: %(default)s)")
    parser.add_argument("--no_per_class", action="store_true", help="do not print the per-class table")
    parser.add_argument("--output", metavar="JSON",
                        help="write all results (per class and per query included) as JSON")
    parser.add_argument("--plot", metavar="PNG", help="draw per-class Top-1 accuracy as a bar chart")
    parser.set_defaults(handler=_run_evaluate)


def _run_evaluate(args: argparse.Namespace) -> int:
    from vitp.retrieval.embedding_store import load_feature_set, open_gallery
    from vitp.errors import RetrievalError
    from vitp.retrieval.evaluate import evaluate_retrieval
    from vitp.retrieval.index import RetrievalIndex
    from vitp.retrieval.pictures import picture_format, write_class_chart
    from vitp.files import check_output_path, write_json

    if args.compare:
        return _run_compare(args)
    if not (args.gallery_features or args.index):
        raise RetrievalError("give the gallery as --gallery_features or --index (or compare two evaluations with --compare)")
    search_parameters = _search_parameters(args)  # refused before the evaluation, not after it
    if args.output:
        check_output_path(args.output)
    if args.plot:
        check_output_path(args.plot, "--plot")
        picture_format(args.plot, "--plot")
    queries = load_feature_set(args.query_features) if args.query_features else None
    gallery = open_gallery(args.gallery_features) if args.gallery_features else None
    index = RetrievalIndex.load(args.index, faiss_device=args.faiss_device) if args.index else None
    top_k = _top_k_within_gallery(args.top_k, len(index if index is not None else gallery), args.leave_one_out)
    report = evaluate_retrieval(
        queries, gallery, index=index, top_k=top_k, leave_one_out=args.leave_one_out, factory=args.factory,
        pca_dimensions=args.pca, whiten=args.whiten, pca_fit=load_feature_set(args.pca_fit) if args.pca_fit else None,
        dba_k=args.dba, dba_alpha=args.dba_alpha, qe_k=args.qe, qe_alpha=args.qe_alpha,
        search_parameters=search_parameters, full_map=not args.no_full_map, faiss_device=args.faiss_device,
        progress_bar=_progress(args), bootstrap_resamples=args.bootstrap or 0, seed=args.seed,
    )
    print("\n".join(report.summary_lines()))
    if not args.no_per_class:
        print()
        print("\n".join(report.class_table_lines()))
    if args.output:
        write_json(report.to_dict(), Path(args.output))
        print(f"wrote {args.output}")
    if args.plot:
        k = report.top_k[0]
        path = write_class_chart(report.per_class, f"top_k.top{k}", f"Top-{k} accuracy per class", Path(args.plot))
        print(f"wrote {path}")
    return 0


def _top_k_within_gallery(top_k: list[int], gallery_size: int, leave_one_out: bool) -> list[int]:
    """The K values a query can fill, saying which were left out (P@K would count absent results as
    misses); refused when none is left."""
    from vitp.errors import RetrievalError

    candidates = gallery_size - 1 if leave_one_out else gallery_size
    kept = [k for k in top_k if k <= candidates]
    too_large = [k for k in top_k if k > candidates]
    if not too_large:
        return top_k
    per_query = f" ({candidates} per query with --leave_one_out)" if leave_one_out else ""
    problem = f"--top_k {' '.join(map(str, too_large))}: the gallery has {gallery_size} images{per_query}, so no query " \
              f"can have that many results"
    if not kept:
        raise RetrievalError(f"{problem}; give K values up to {candidates}")
    print(f"{problem}: left out", file=sys.stderr)
    return kept


def _run_compare(args: argparse.Namespace) -> int:
    """`vitp evaluate --compare A.json B.json`: paired-bootstrap differences of two evaluations."""
    from vitp.errors import RetrievalError
    from vitp.retrieval.statistics import compare, query_results_from_dict
    from vitp.files import check_output_path, read_json, write_json

    given = [flag for flag, value in (("--query_features", args.query_features), ("--gallery_features", args.gallery_features),
                                      ("--index", args.index), ("--plot", args.plot)) if value]
    if given:
        raise RetrievalError(f"--compare reads two finished evaluations; {', '.join(given)} cannot be used with it")
    if args.output:
        check_output_path(args.output)
    path_a, path_b = (Path(p) for p in args.compare)
    name_a, name_b = (path_a.stem, path_b.stem) if path_a.stem != path_b.stem else (str(path_a), str(path_b))
    data_a, data_b = (read_json(path, RetrievalError) for path in (path_a, path_b))  # each file read once
    resamples = args.bootstrap or COMPARE_RESAMPLES
    if any(isinstance(d, dict) and d.get("task") in DENSE_TASKS for d in (data_a, data_b)):  # `vitp finetune` runs
        from vitp.downstream.metrics import DenseEvaluation, paired_comparison

        comparison = paired_comparison(DenseEvaluation.from_dict(data_a, str(path_a)),
                                       DenseEvaluation.from_dict(data_b, str(path_b)), resamples, args.seed,
                                       name_a, name_b)
    else:
        comparison = compare(query_results_from_dict(data_a, str(path_a)), query_results_from_dict(data_b, str(path_b)),
                             resamples, args.seed, name_a, name_b)
    print("\n".join(comparison.lines()))
    if args.output:
        write_json(comparison.to_dict(), Path(args.output))
        print(f"wrote {args.output}")
    return 0
