"""The engine: one model, its KV cache, its scheduler; requests in, per-step deltas out.

The parts of a step are separate calls so that a driver can put them on different threads:
``schedule`` (CPU policy and input preparation), ``launch`` and ``collect`` (the model and the
sampler; the only calls that touch the device) and ``process`` (append tokens, check stops,
detokenize, free finished sequences). ``engine.step_loop.StepLoop`` strings them together, one
step ahead on a GPU; ``step`` is one turn of the engine's own loop.
"""

from __future__ import annotations

import gc
import itertools
import json
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import torch

from mini_vllm.engine.attention import check_gpu_head_dim
from mini_vllm.engine.block_manager import BlockManager
from mini_vllm.engine.config import EngineArgs, ModelConfig
from mini_vllm.engine.detokenizer import IncrementalDetokenizer
from mini_vllm.engine.errors import ConfigError, EngineClosed, InvalidRequest, MiniVllmError, ModelLoadError
from mini_vllm.engine.kv_cache import allocate_kv_cache, gpu_kv_budget_bytes, num_blocks_for_budget
from mini_vllm.engine.landing import land_step
from mini_vllm.engine.loader import ModelSource, build_model, resolve_model
from mini_vllm.engine.model_runner import ModelOutput, ModelRunner, StepHandle, StepInputs, prepare_inputs
from mini_vllm.engine.outputs import RequestDelta, SampleDelta
from mini_vllm.engine.parallel import RankFailed, TensorParallel, check_tensor_parallel
from mini_vllm.engine.prompts import PromptEncoder
from mini_vllm.engine.sampling_params import SamplingParams
from mini_vllm.engine.scheduler import Scheduler, SchedulerOutput
from mini_vllm.engine.sequence import PLACEHOLDER, Request, SeqStatus, Sequence
from mini_vllm.engine.step_loop import StepLoop, StepTiming

if TYPE_CHECKING:
    from mini_vllm.engine.tp_worker import WorkerPool


@attrs.frozen
class ScheduledBatch:
    scheduled: SchedulerOutput
    inputs: StepInputs


@attrs.frozen
class EngineStats:
    model: str
    num_running: int
    num_waiting: int
    num_requests: int
    num_preemptions: int
    steps: int
    prompt_tokens_computed: int
    generation_tokens: int
    num_kv_blocks: int
    block_size: int


def load_tokenizer(directory: Path | None) -> Any:
    if directory is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(directory), trust_remote_code=False)
    except Exception as exc:  # transformers raises many kinds for a missing or broken tokenizer
        raise ModelLoadError(f"{directory}: cannot load the tokenizer ({type(exc).__name__}: {exc})") from None


def generation_eos_ids(directory: Path | None, config: ModelConfig) -> tuple[int, ...]:
    """EOS ids from generation_config.json when present (it wins), else from config.json."""
    if directory is not None and (directory / "generation_config.json").is_file():
        try:
            raw = json.loads((directory / "generation_config.json").read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise ModelLoadError(f"{directory}/generation_config.json: not valid JSON ({exc})") from None
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):
            return tuple(int(e) for e in eos)
        if eos is not None:
            return (int(eos),)
    return config.eos_token_ids


def load_rank(args: EngineArgs, source: ModelSource, max_len: int, device: torch.device, dtype: torch.dtype,
              tp: TensorParallel | None) -> tuple[ModelRunner, int, int]:
    """Build one rank's model (all of it without ``tp``), its runner and KV cache; returns the
    runner, the number of KV blocks (agreed by every rank: the smallest) and the max model length.

    Every rank of a tensor-parallel engine runs exactly this, so their collectives (profiling,
    the block count, the GPU's warm-up and graph capture) pair up in the same order.
    """
    torch.manual_seed(args.seed)
    model = build_model(source, max_len, dtype, device, args.seed, tp)
    config = model.config  # this rank's shapes: its KV heads are what its cache holds
    runner: ModelRunner
    if device.type == "cuda":
        from mini_vllm.engine.cuda_runner import CudaModelRunner  # needs triton, which a CPU install may lack

        runner = CudaModelRunner(
            model, None, device, args.seed, max_num_seqs=args.max_num_seqs,
            max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=max_len,
            block_size=args.block_size, enforce_eager=args.enforce_eager, skinny_kernels=args.skinny_kernels,
            dependent_launch=args.programmatic_dependent_launch, parallel=tp,
        )
    elif args.programmatic_dependent_launch:
        raise ConfigError(f"programmatic_dependent_launch needs a CUDA GPU of compute capability 9.0 or newer, "
                          f"and this engine runs on {device}")
    else:
        runner = ModelRunner(model, None, device, args.seed, parallel=tp)
    if args.num_kv_blocks is not None:
        num_blocks = args.num_kv_blocks
    elif device.type == "cuda":
        peak = runner.profile_peak_bytes(args.max_num_batched_tokens)  # type: ignore[attr-defined]
        # The graphs keep their logits and activations in a private pool.
        graph_reserve = runner.graph_reserve_bytes(peak)  # type: ignore[attr-defined]
        budget = gpu_kv_budget_bytes(device, args.gpu_memory_utilization, peak + graph_reserve)
        num_blocks = num_blocks_for_budget(config, args.block_size, dtype, budget)
    else:
        num_blocks = num_blocks_for_budget(config, args.block_size, dtype, args.cpu_kv_cache_bytes)
    if tp is not None:
        num_blocks = tp.min_int(num_blocks)
    capacity = num_blocks * args.block_size
    if capacity < max_len:
        if args.max_model_len is not None:
            raise ConfigError(
                f"max_model_len={args.max_model_len} does not fit in the KV cache ({num_blocks} blocks of "
                f"{args.block_size} = {capacity} tokens): raise num_kv_blocks / the memory budget or lower max_model_len"
            )
        max_len = capacity  # a default length is capped to what one sequence can hold
    kv_cache = allocate_kv_cache(config, num_blocks, args.block_size, dtype, device)
    runner.set_kv_cache(kv_cache)
    return runner, num_blocks, max_len


class LLMEngine:
    def __init__(self, args: EngineArgs, source: ModelSource, runner: ModelRunner, num_blocks: int, max_model_len: int,
                 tokenizer: Any, eos_ids: tuple[int, ...], workers: WorkerPool | None = None) -> None:
        self.args = args
        # Tensor parallelism: the other ranks' processes (None: this process holds the whole model).
        self.workers = workers
        self._failure: str | None = None  # why the engine closed itself (a rank died)
        if workers is not None:
            weakref.finalize(self, workers.stop)  # an engine dropped without close() leaves no process
        self.name = source.name
        self.model_config = source.config
        self.runner = runner
        self.prompts = PromptEncoder(source.name, tokenizer, max_model_len, source.config.vocab_size)
        self.source_directory = source.directory  # where a frontend loads the same tokenizer from
        self.eos_ids = eos_ids
        self.max_model_len = max_model_len
        self.block_manager = BlockManager(num_blocks, args.block_size, args.enable_prefix_caching, namespace=source.name)
        self.scheduler = Scheduler(
            self.block_manager, args.max_num_seqs, args.max_num_batched_tokens, max_model_len,
            chunked_prefill=args.enable_chunked_prefill,
        )
        # Schedule step N+1 before step N lands: on GPUs, where a launch returns at once.
        pipelined = args.async_scheduling if args.async_scheduling is not None else runner.device.type == "cuda"
        self.loop = StepLoop(pipelined)  # step()'s; the scheduler actor runs its own
        self.requests: dict[str, Request] = {}
        # Requests in self.requests whose penalties need real output tokens (can_schedule_ahead):
        # kept as requests come and go, so that a step does not scan them all.
        self._penalized: set[str] = set()
        self._arrivals = itertools.count()
        self._seq_ids = itertools.count()
        self._steps = 0
        self._prompt_tokens = 0
        self._generation_tokens = 0

    @property
    def tokenizer(self) -> Any:
        return self.prompts.tokenizer

    @tokenizer.setter
    def tokenizer(self, value: Any) -> None:
        self.prompts.tokenizer = value

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def from_engine_args(cls, args: EngineArgs) -> LLMEngine:
        try:
            return cls._load(args)
        finally:
            # Loading runs first-time imports and kernel compiles, and some leave garbage cycles that
            # hold a frame (trio and torch.fx do at import); a frame keeps its callers' frames alive
            # through f_back, _load's among them, with the weights and KV cache in its locals.
            # Collect that garbage now, so that dropping the engine (or a failed load's exception)
            # frees the memory by reference counting alone, at once.
            gc.collect()

    @classmethod
    def _load(cls, args: EngineArgs) -> LLMEngine:
        device = args.resolved_device()
        dtype = args.resolved_dtype(device)
        source = resolve_model(args)
        config = source.config
        # Before anything loads or starts: sizes that do not split the model are refused at once.
        check_tensor_parallel(config, args.tensor_parallel_size)
        max_len = args.max_model_len or config.max_position_embeddings
        if args.max_model_len and args.max_model_len > config.max_position_embeddings:
            raise ConfigError(
                f"max_model_len must be <= the model's max_position_embeddings ({config.max_position_embeddings}), "
                f"got {args.max_model_len}"
            )
        # Before the weights load, not after: the Scheduler would refuse the same budget later.
        Scheduler.check_budget(args.enable_chunked_prefill, args.max_num_batched_tokens, max_len)
        if device.type == "cuda":
            check_gpu_head_dim(config.head_dim)
        tokenizer = load_tokenizer(source.directory) if not args.skip_tokenizer_init else None
        eos_ids = generation_eos_ids(source.directory, config)
        if args.tensor_parallel_size > 1:
            return cls._load_parallel(args, source, max_len, device, dtype, tokenizer, eos_ids)
        runner, num_blocks, max_len = load_rank(args, source, max_len, device, dtype, None)
        return cls(args, source, runner, num_blocks, max_len, tokenizer, eos_ids)

    @classmethod
    def _load_parallel(cls, args: EngineArgs, source: ModelSource, max_len: int, device: torch.device,
                       dtype: torch.dtype, tokenizer: Any, eos_ids: tuple[int, ...]) -> LLMEngine:
        """Rank 0 here, ranks 1..N-1 in worker processes started now; each loads its shard."""
        from mini_vllm.engine.tp_worker import WorkerPool, rank_device

        size = args.tensor_parallel_size
        if device.type == "cuda":
            last = rank_device(device, size - 1)
            if last.index is not None and last.index >= torch.cuda.device_count():
                raise ConfigError(
                    f"tensor_parallel_size={size} needs GPUs {device.index or 0}..{last.index}, "
                    f"but {torch.cuda.device_count()} are visible"
                )
            device = rank_device(device, 0)
        workers = WorkerPool.start(args, source, max_len, device)
        try:
            runner, num_blocks, max_len = load_rank(args, source, max_len, device, dtype, workers.tp)
        except MiniVllmError:  # refused here (and by every rank alike): no rank is to blame
            workers.stop(kill=True)
            raise
        except Exception as exc:  # a collective failed: a rank died while loading
            raise workers.failure(exc, "loading") from exc
        except BaseException:
            workers.stop(kill=True)
            raise
        return cls(args, source, runner, num_blocks, max_len, tokenizer, eos_ids, workers)

    # ---- lifetime -------------------------------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self.runner.closed

    def close(self) -> None:
        """Free the device memory now (weights, KV cache, CUDA graphs and their pool, pinned
        buffers, streams) instead of when the last reference goes; idempotent. Requests in flight
        are dropped without a last delta; adding or launching afterwards raises ``EngineClosed``."""
        if self.runner.closed:
            return
        self.loop.reset()
        for request in self.requests.values():
            request.sequences.clear()  # Request <-> Sequence is a cycle (see _request_delta)
        self.requests.clear()
        self._penalized.clear()
        self.runner.close()
        if self.workers is not None:
            self.workers.stop()

    def _check_open(self) -> None:
        if self._failure is not None:
            raise EngineClosed(f"model {self.name!r}: {self._failure}")
        if self.runner.closed:
            raise EngineClosed(f"model {self.name!r}: this engine is closed (close() freed its model): build a new one")

    def _rank_failed(self, workers: WorkerPool, exc: BaseException) -> RankFailed:
        """Any failed step of a tensor-parallel engine is fatal: the ranks' collectives no longer
        pair up. Stop every rank, close the engine, and say which rank failed."""
        failure = workers.failure(exc, "a step")
        self._failure = str(failure)
        self.close()
        return failure

    # ---- requests -------------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        return self.prompts.tokenize(prompt)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        return self.prompts.apply_chat_template(messages)

    def validate_request(self, prompt_token_ids: list[int], params: SamplingParams, detokenize: bool = True) -> None:
        """What would fail a step if it reached one (the step of every request batched with it);
        ``detokenize=False``: stop strings are someone else's (the frontend's)."""
        self.prompts.check_prompt(prompt_token_ids)
        self.prompts.check_params(params)
        if params.stop and detokenize and self.tokenizer is None:
            raise InvalidRequest("stop strings need a tokenizer; this model has none (use stop_token_ids)")

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams, priority: int = 0,
                    prompt: str | None = None, detokenize: bool = True) -> None:
        """``detokenize=False``: no text and no stop strings here (a frontend does both on the
        token ids and aborts the request at a stop string)."""
        self._check_open()
        if request_id in self.requests:
            raise InvalidRequest(f"request id {request_id!r} is already in flight")
        self.validate_request(prompt_token_ids, params, detokenize)
        request = Request(request_id, prompt, list(prompt_token_ids), params, priority, next(self._arrivals),
                          detokenize=detokenize)
        seq = self._new_sequence(request, 0, list(prompt_token_ids))
        self.requests[request_id] = request
        if params.uses_penalties:
            self._penalized.add(request_id)
        self.scheduler.add(seq)

    def _new_sequence(self, request: Request, index: int, token_ids: list[int]) -> Sequence:
        detok = (
            IncrementalDetokenizer(self.tokenizer, request.prompt_token_ids, request.params.stop)
            if self.tokenizer is not None and request.detokenize
            else None
        )
        seq = Sequence(next(self._seq_ids), request, index, token_ids, detok)
        if request.params.logprobs is not None:
            seq.logprobs = []
        request.sequences.append(seq)
        return seq

    def abort_request(self, request_id: str) -> RequestDelta | None:
        """Stop a request now and free its blocks; its last delta says ``abort``."""
        request = self.requests.pop(request_id, None)
        if request is None:
            return None
        self._penalized.discard(request_id)
        deltas = []
        for seq in request.sequences:
            if seq.status is SeqStatus.FINISHED:
                continue
            self.scheduler.remove(seq)
            seq.finish_reason = "abort"
            deltas.append(self._take_delta(seq))
        request.sequences.clear()  # the cycle with its sequences (see _request_delta)
        return RequestDelta(request_id, tuple(deltas), len(request.prompt_token_ids), True, request.scheduled_at)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests) or self.loop.in_flight

    # ---- after a failed step (engine.fault_isolation) --------------------------------------------
    def roll_back(self) -> list[str]:
        """A step failed and its tokens are lost: every running sequence goes back to its landed
        tokens and waits to be recomputed (as after a preemption, so greedy outputs stay exact).
        The driver resets its step loop. Returns the requests that were running, in batch order."""
        running = list(self.scheduler.running)
        for seq in [*running, *self.scheduler.waiting, *self.scheduler.held]:
            while seq.token_ids and seq.token_ids[-1] == PLACEHOLDER:
                seq.token_ids.pop()
            seq.length_capped = False  # decided again when it is scheduled
        for seq in running:
            self.scheduler.requeue(seq)
        for request in self.requests.values():
            if request.forked and len(request.sequences) == 1 and request.params.n > 1:
                request.forked = False  # the fork never landed: the prefill forks again
        return list(dict.fromkeys(seq.request.request_id for seq in running))

    def hold(self, request_id: str) -> None:
        """Keep a request's waiting sequences out of scheduling (while a failed step's cause is sought)."""
        for seq in self._sequences_of(request_id):
            self.scheduler.hold(seq)

    def release(self, request_id: str) -> None:
        for seq in self._sequences_of(request_id):
            self.scheduler.release(seq)

    def _sequences_of(self, request_id: str) -> list[Sequence]:
        request = self.requests.get(request_id)
        return [s for s in request.sequences if s.status is not SeqStatus.FINISHED] if request is not None else []

    @property
    def async_scheduling(self) -> bool:
        return self.loop.pipelined

    @async_scheduling.setter
    def async_scheduling(self, value: bool) -> None:
        self.loop.pipelined = value

    @property
    def step_timings(self) -> list[StepTiming] | None:
        """Host time of each ``step`` (benchmarks turn this on with ``engine.step_timings = []``)."""
        return self.loop.timings

    @step_timings.setter
    def step_timings(self, value: list[StepTiming] | None) -> None:
        self.loop.timings = value

    # ---- the step ----------------------------------------------------------------------------
    def schedule(self, in_flight: ScheduledBatch | None = None) -> ScheduledBatch | None:
        """The next step, or None; ``in_flight`` is the launched step not yet processed, whose
        tokens this one reads as placeholders."""
        scheduled = self.scheduler.schedule()
        if not scheduled.seqs:
            return None
        previous = in_flight.inputs if in_flight is not None else None
        return ScheduledBatch(scheduled, prepare_inputs(scheduled, self.args.block_size, self.eos_ids, previous))

    def launch(self, batch: ScheduledBatch) -> StepHandle:
        """Queue the step on the device and return at once (on the CPU: runs it).

        The next ``schedule`` may then run before this step is processed: it reads this step's
        tokens as placeholders. Check ``can_schedule_ahead`` first.
        """
        self._check_open()
        workers = self.workers
        if workers is None:
            return self.runner.launch(batch.inputs)
        try:
            workers.send(batch.inputs)  # once per step; the workers run the same step on their shards
            return self.runner.launch(batch.inputs)
        except Exception as exc:
            raise self._rank_failed(workers, exc) from exc

    def collect(self, handle: StepHandle) -> ModelOutput:
        """Wait for a launched step and read its sampled tokens back."""
        workers = self.workers
        if workers is None:
            return self.runner.collect(handle)
        try:
            return self.runner.collect(handle)
        except Exception as exc:
            raise self._rank_failed(workers, exc) from exc

    def execute(self, batch: ScheduledBatch) -> ModelOutput:
        return self.collect(self.launch(batch))

    def batch_shape(self, batch: ScheduledBatch) -> tuple[int, int, bool]:
        inputs = batch.inputs
        return len(inputs.query_lens), len(inputs.input_ids), inputs.is_decode_only

    def step(self) -> list[RequestDelta]:
        """One turn of the engine's step loop (``engine.step_loop``): on a GPU, launch step N+1,
        then land step N."""
        return self.loop.run(self).deltas

    def can_schedule_ahead(self) -> bool:
        """Whether the next step may be scheduled before the launched one lands: not while a
        request's penalties need its real output tokens."""
        return not self._penalized

    def process(self, batch: ScheduledBatch, output: ModelOutput) -> list[RequestDelta]:
        """Land a step's tokens: fill placeholders, fork n > 1 samples, check stops, free finished."""
        self._steps += 1
        landed = land_step(batch.scheduled, output, self.scheduler, self._new_sequence, self.eos_ids,
                           self.max_model_len)
        self._prompt_tokens += landed.prompt_tokens
        self._generation_tokens += landed.generation_tokens
        return [self._request_delta(r) for r in landed.touched.values()]

    def _take_delta(self, seq: Sequence) -> SampleDelta:
        reason = seq.finish_reason
        text = seq.detokenizer.take(reason is not None) if seq.detokenizer is not None else ""
        logprobs = None
        if seq.logprobs is not None:
            logprobs = tuple(seq.new_logprobs)
            seq.new_logprobs.clear()
        # The news is copied out and the list emptied in place: no new list per sequence per step.
        delta = SampleDelta(seq.index, tuple(seq.new_token_ids), text, logprobs, reason)
        seq.new_token_ids.clear()
        seq.delta_pending = False
        return delta

    def _request_delta(self, request: Request) -> RequestDelta:
        sequences = request.sequences
        if len(sequences) == 1:  # n == 1: the common case, without a generator
            seq = sequences[0]
            deltas: tuple[SampleDelta, ...] = (self._take_delta(seq),) if seq.delta_pending else ()
            finished = seq.status is SeqStatus.FINISHED
        else:
            deltas = tuple(self._take_delta(s) for s in sequences if s.delta_pending)
            finished = request.finished
        if finished:
            self.requests.pop(request.request_id, None)
            self._penalized.discard(request.request_id)
            # Each sequence points at its request and the request lists them: break that cycle,
            # which would keep the sequences, their detokenizers and the tokenizer alive until
            # the cyclic GC runs. A step still in flight skips finished sequences.
            request.sequences.clear()
        return RequestDelta(request.request_id, deltas, len(request.prompt_token_ids), finished, request.scheduled_at)

    # ---- observation ----------------------------------------------------------------------------
    def statistics(self) -> EngineStats:
        return EngineStats(
            model=self.name,
            num_running=len(self.scheduler.running),
            num_waiting=len(self.scheduler.waiting),
            num_requests=len(self.requests),
            num_preemptions=self.scheduler.num_preemptions,
            steps=self._steps,
            prompt_tokens_computed=self._prompt_tokens,
            generation_tokens=self._generation_tokens,
            num_kv_blocks=self.block_manager.num_blocks,
            block_size=self.args.block_size,
        )
