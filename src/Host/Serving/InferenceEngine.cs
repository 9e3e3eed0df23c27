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
    private readonly ConcurrentQueue<CompletionJob> pending = new();
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
    public int Queued => pending.Count;

    public void Submit(CompletionJob job)
    {
        pending.Enqueue(job);
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
            if (pending.IsEmpty) continue;
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
            if (!pending.IsEmpty) signal.Release(); // rows left for the next batch
        }
        foreach (var job in pending) job.Completion.TrySetCanceled();
    }

    private void RunBatch()
    {
        var jobs = new List<CompletionJob>();
        var later = new List<CompletionJob>();
        while (jobs.Count < options.MaxBatchSize && pending.TryDequeue(out var job))
        {
            if (job.Cancellation.IsCancellationRequested) Finish(job, new CompletionResult("", job.Prompt.Length, 0, "cancelled"));
            else if (job.Adapter != IAdapterSet.BaseName && !hub.Registered.ContainsKey(job.Adapter))
                Fail(job, new KeyNotFoundException($"the model '{job.Adapter}' does not exist (it was removed)"));
            // An adapter whose method cannot share a batch is served one adapter at a time.
            else if (!hub.CanMix && jobs.Count > 0 && job.Adapter != jobs[0].Adapter) later.Add(job);
            else jobs.Add(job);
        }
        foreach (var job in later) pending.Enqueue(job); // keeps them, a little out of order, for the next batch
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
            foreach (var job in jobs.Skip(1)) pending.Enqueue(job);
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
            foreach (var job in jobs) Fail(job, e);
            return;
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
