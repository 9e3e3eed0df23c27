using System.Collections.Concurrent;
using LoRAHub.Abstractions;
using LoRAHub.Host.Everyday;
using LoRAHub.Models.Generation;
using Microsoft.Extensions.Logging;

namespace LoRAHub.Host.Serving;

/// <summary>
/// serve's scheduler: one worker thread owns the model. It gathers the requests that arrived together (waiting
/// <see cref="ServeOptions.BatchWait"/> after the first) into one batch of up to <see cref="ServeOptions.MaxBatchSize"/>
/// rows, each row with its own adapter, options and seed (mixed-batch inference through IAdapterSet), decodes them
/// together, and streams every row's text as it comes. Adapter registration and removal run on the same thread between
/// batches, so the adapter set never changes under a forward. Batches are static: a request that arrives while a batch
/// decodes joins the next one.
/// </summary>
public sealed class InferenceEngine : IDisposable
{
    private readonly LoadedModel model;
    private readonly AdapterHub hub;
    private readonly ServeOptions options;
    private readonly ILogger log;
    // Requests waiting for a batch, oldest first. A batch takes what fits and leaves the rest where they are, so the
    // rows that wait keep their order (and the oldest is taken first next time).
    private readonly LinkedList<CompletionJob> pending = new();
    private readonly object queueLock = new();
    private readonly ConcurrentQueue<Action> control = new();
    private readonly SemaphoreSlim signal = new(0);
    private readonly CancellationTokenSource stopping = new();
    private readonly Thread worker;

    public InferenceEngine(LoadedModel model, AdapterHub hub, ServeOptions options, ILogger log)
    {
        this.model = model;
        this.hub = hub;
        this.options = options;
        this.log = log;
        worker = new Thread(Work) { Name = "lorahub-serve", IsBackground = true };
        worker.Start();
    }

    /// <summary>Rows decoded so far and batches run (for tests and the throughput benchmark).</summary>
    public long RowsDecoded => Interlocked.Read(ref rowsDecoded);
    public long Batches => Interlocked.Read(ref batches);
    /// <summary>The most rows one batch has held, and the most distinct adapters (base included) in one batch.</summary>
    public int LargestBatch { get; private set; }
    public int MostAdaptersInOneBatch { get; private set; }
    private long rowsDecoded, batches, rowsCancelled;

    /// <summary>Requests whose client left: dropped from the queue, or finished early in their batch.</summary>
    public long RowsCancelled => Interlocked.Read(ref rowsCancelled);

    /// <summary>The adapters in memory after the last batch or change, most recently used first (a snapshot other threads may read).</summary>
    public IReadOnlyList<string> Loaded { get; private set; } = [];

    /// <summary>Requests waiting for a batch.</summary>
    public int Queued
    {
        get
        {
            lock (queueLock) return pending.Count;
        }
    }

    public void Submit(CompletionJob job)
    {
        lock (queueLock) pending.AddLast(job);
        signal.Release();
    }

    /// <summary>Runs an action on the worker thread between batches (adapter changes) and returns its result.</summary>
    public Task<T> OnWorker<T>(Func<AdapterHub, T> action)
    {
        var done = new TaskCompletionSource<T>(TaskCreationOptions.RunContinuationsAsynchronously);
        control.Enqueue(() =>
        {
            // Loaded is updated before the caller resumes, so an answer to an adapter change already shows its effect.
            try
            {
                var result = action(hub);
                Loaded = hub.Loaded;
                done.SetResult(result);
            }
            catch (Exception e)
            {
                Loaded = hub.Loaded;
                done.SetException(e);
            }
        });
        signal.Release();
        return done.Task;
    }

    private void Work()
    {
        while (!stopping.IsCancellationRequested)
        {
            try
            {
                signal.Wait(stopping.Token);
            }
            catch (OperationCanceledException)
            {
                break;
            }
            while (control.TryDequeue(out var action)) action();
            if (Queued == 0) continue;
            // Let requests sent together arrive together.
            if (options.BatchWait > TimeSpan.Zero) Thread.Sleep(options.BatchWait);
            while (control.TryDequeue(out var action)) action();
            try
            {
                RunBatch();
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                // RunBatch fails its own jobs; this keeps the worker alive whatever slipped through.
                log.LogError(e, "serve worker: unexpected error between batches");
            }
            Loaded = hub.Loaded;
            if (Queued > 0) signal.Release(); // rows left for the next batch
        }
        lock (queueLock)
            foreach (var job in pending) job.Completion.TrySetCanceled();
    }

    private void RunBatch()
    {
        var jobs = new List<CompletionJob>();
        var adapters = new HashSet<string>(StringComparer.Ordinal); // the distinct adapters (base model excluded) taken
        lock (queueLock)
            for (var node = pending.First; node is not null && jobs.Count < options.MaxBatchSize;)
            {
                var next = node.Next;
                var job = node.Value;
                var isNew = job.Adapter != IAdapterSet.BaseName && !adapters.Contains(job.Adapter);
                if (job.Cancellation.IsCancellationRequested)
                {
                    pending.Remove(node);
                    Finish(job, new CompletionResult("", job.Prompt.Length, 0, "cancelled"));
                }
                else if (job.Adapter != IAdapterSet.BaseName && !hub.Registered.ContainsKey(job.Adapter))
                {
                    pending.Remove(node);
                    Fail(job, new KeyNotFoundException($"the model '{job.Adapter}' does not exist (it was removed)"));
                }
                // Left queued, in place, for the next batch: a row of another adapter where the loaded method cannot
                // share a batch (served one adapter at a time), and a row of one more adapter than may be loaded at once.
                else if (!hub.CanMix && jobs.Count > 0 && job.Adapter != jobs[0].Adapter) { }
                else if (isNew && adapters.Count >= hub.MaxLoaded) { }
                else
                {
                    pending.Remove(node);
                    jobs.Add(job);
                    if (isNew) adapters.Add(job.Adapter);
                }
                node = next;
            }
        if (jobs.Count == 0) return;

        IAdapterSet? set;
        IReadOnlyList<string> rowNames;
        IDisposable? scope;
        try
        {
            (set, rowNames, scope) = hub.Prepare(jobs.Select(j => j.Adapter).ToList());
        }
        catch (MixedBatchNotSupportedException)
        {
            // Learned only now (the first adapter of a method without IAdapterSet was just loaded): split by adapter.
            // The others go back to the front of the queue, in their order.
            lock (queueLock)
                for (var i = jobs.Count - 1; i >= 1; i--) pending.AddFirst(jobs[i]);
            jobs = [jobs[0]];
            try
            {
                (set, rowNames, scope) = hub.Prepare([jobs[0].Adapter]);
            }
            catch (Exception e) when (e is not OutOfMemoryException)
            {
                Fail(jobs[0], e);
                return;
            }
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            // One adapter that cannot (re)load (its folder gone, a corrupt file, no memory for it) must not fail the
            // rows of the others: only its rows fail, and the rest run.
            log.LogWarning(e, "preparing a batch of {Rows} rows failed; trying its adapters one by one", jobs.Count);
            jobs = DropUnloadable(jobs);
            if (jobs.Count == 0) return;
            try
            {
                (set, rowNames, scope) = hub.Prepare(jobs.Select(j => j.Adapter).ToList());
            }
            catch (Exception again) when (again is not OutOfMemoryException)
            {
                foreach (var job in jobs) Fail(job, again);
                return;
            }
        }

        Loaded = hub.Loaded;
        foreach (var job in jobs) job.Stream = new TextStream(model.Tokenizer, job.Stops);
        var rows = jobs.Select((j, i) => new GenerationRow(j.Prompt, j.Options, rowNames[i])).ToList();
        LargestBatch = Math.Max(LargestBatch, rows.Count);
        MostAdaptersInOneBatch = Math.Max(MostAdaptersInOneBatch, jobs.Select(j => j.Adapter).Distinct().Count());
        try
        {
            int[][] tokens;
            using (scope)
                tokens = TextGenerator.Generate(model.Model, rows, set, (row, token) =>
                {
                    var job = jobs[row];
                    if (job.Cancellation.IsCancellationRequested) return false;
                    var delta = job.Stream!.Add(token);
                    if (delta.Length > 0) job.Deltas.Writer.TryWrite(delta);
                    return !job.Stream.Stopped;
                });
            Interlocked.Increment(ref batches);
            Interlocked.Add(ref rowsDecoded, rows.Count);
            for (var i = 0; i < jobs.Count; i++)
            {
                var job = jobs[i];
                var stream = job.Stream!;
                var tail = stream.Flush();
                if (tail.Length > 0) job.Deltas.Writer.TryWrite(tail);
                var reason = job.Cancellation.IsCancellationRequested ? "cancelled"
                    : stream.Stopped || (tokens[i].Length > 0 && job.Options.StopTokenIds.Contains(tokens[i][^1])) ? "stop" : "length";
                Finish(job, new CompletionResult(stream.Text, job.Prompt.Length, tokens[i].Length, reason));
            }
        }
        catch (Exception e) when (e is not OutOfMemoryException)
        {
            log.LogError(e, "batch of {Rows} rows failed", rows.Count);
            foreach (var job in jobs) Fail(job, e);
        }
    }

    /// <summary>
    /// Prepares each adapter of the batch alone: fails the rows of those that cannot load (503, naming the adapter,
    /// its folder and the cause) and returns the other rows.
    /// </summary>
    private List<CompletionJob> DropUnloadable(List<CompletionJob> jobs)
    {
        var failed = new Dictionary<string, Exception>(StringComparer.Ordinal);
        foreach (var name in jobs.Select(j => j.Adapter).Where(n => n != IAdapterSet.BaseName).Distinct().ToList())
        {
            try
            {
                hub.Prepare([name]).Scope?.Dispose();
            }
            catch (Exception e) when (e is not OutOfMemoryException and not MixedBatchNotSupportedException)
            {
                var folder = hub.Registered.TryGetValue(name, out var f) ? f : "?";
                log.LogError(e, "adapter {Adapter} cannot be loaded from {Folder}", name, folder);
                failed[name] = new OpenAiError(503,
                    $"the adapter '{name}' cannot be loaded from {folder}: {e.GetType().Name}: {e.Message}. " +
                    "Fix its folder, or register it again (DELETE and POST /v1/adapters).",
                    "model", "adapter_load_failed", type: "server_error");
            }
        }
        foreach (var job in jobs)
            if (failed.TryGetValue(job.Adapter, out var error)) Fail(job, error);
        return jobs.Where(j => !failed.ContainsKey(j.Adapter)).ToList();
    }

    private void Finish(CompletionJob job, CompletionResult result)
    {
        if (result.FinishReason == "cancelled") Interlocked.Increment(ref rowsCancelled);
        job.Deltas.Writer.TryComplete();
        job.Completion.TrySetResult(result);
    }

    private static void Fail(CompletionJob job, Exception e)
    {
        job.Deltas.Writer.TryComplete(e);
        job.Completion.TrySetException(e);
    }

    public void Dispose()
    {
        stopping.Cancel();
        worker.Join();
        signal.Dispose();
        stopping.Dispose();
    }
}
