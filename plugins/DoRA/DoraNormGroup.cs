using LoRAHub.TorchExtensions;
using LoRAHub.Tuners.Lora;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.DoRA;

/// <summary>
/// The layers one DoRA adapter (one <see cref="DoraVariant"/>) lives on, so that a training step's detached norms
/// ‖W0 + s·B·A‖ and row scales m/‖V‖ are computed for all of them at once: the first forward of the step that misses its
/// cached norm fills every member's cache (<see cref="DoraLinearLayer.CacheNorm"/>) by one grouped kernel launch
/// (<see cref="LoraWeightNorms.grouped_low_rank_row_norms"/>) instead of one launch, one cache check and one division
/// per projection as each forward comes. Valid because nothing the norm depends on changes inside a step (the same
/// argument as the per-layer cache: each member's <see cref="DoraLinearLayer.NormKey"/> is taken now, and a member whose
/// key has changed by its forward misses and computes its own). Members that cannot take the kernel (a quantized base,
/// another device, merged or inactive, CPU) are left to their own forward. Members are held weakly (the prepared launch
/// holds those it covers until it is rebuilt). The launch is prepared once and run again while every member it covers
/// is as it was (the same tensors, keys and buffers; values are read at each run): checking and laying out ~112
/// projections took ~2 ms of host time per step, the per-step check takes a few µs per member.
/// </summary>
internal sealed class DoraNormGroup
{
    private readonly List<(WeakReference<LoraLinear> layer, string adapter)> members = new();
    private long filledStep = -1, version;
    private Plan? plan;
    // The rest's launch on the side stream while libtorch's stream has not waited for it yet.
    private LoraWeightNorms.GroupedNormLaunch.BesideRun? pending;

    // A prepared launch and what it covers: per member its layer, adapter, DoRA state, norm key (Step 0), the buffers the
    // kernel writes (the member's cached norm and row scale) and W's storage the launch reads (the key names the weight
    // tensor, whose storage a re-homing into a stack moves).
    private sealed record Entry(LoraLinear Layer, string Adapter, DoraLinearLayer Dora, DoraLinearLayer.NormKey Key, Tensor Norm, Tensor Scale,
        IntPtr Weight);

    // First: the launch on libtorch's stream; Rest (or null): the one on the side stream, and whose norms it computes.
    private sealed record Plan(List<Entry> Entries, LoraWeightNorms.GroupedNormLaunch First, LoraWeightNorms.GroupedNormLaunch? Rest,
        HashSet<DoraLinearLayer> RestMembers, long Version)
    {
        public void Dispose()
        {
            First.Dispose();
            Rest?.Dispose();
        }
    }

    /// <summary>Adds the adapter on <paramref name="layer"/> (again: no change).</summary>
    public void Add(LoraLinear layer, string adapter)
    {
        lock (members)
        {
            members.RemoveAll(m => !m.layer.TryGetTarget(out var l) || ReferenceEquals(l, layer) && m.adapter == adapter);
            members.Add((new WeakReference<LoraLinear>(layer), adapter));
            version++;
        }
    }

    /// <summary>Drops the adapter on <paramref name="layer"/> (the adapter was deleted there).</summary>
    public void Remove(LoraLinear layer, string adapter)
    {
        lock (members)
        {
            members.RemoveAll(m => !m.layer.TryGetTarget(out var l) || ReferenceEquals(l, layer) && m.adapter == adapter);
            version++;
        }
    }

    /// <summary>
    /// Fills the norm caches of the members in training step <paramref name="step"/> on <paramref name="on"/>'s device
    /// that have none for their current key, in one grouped launch; at most once per step (a later miss in the same step,
    /// e.g. after an announced write, is the member's own to compute). True when a launch ran.
    /// </summary>
    public bool Fill(DoraVariant variant, long step, Tensor on)
    {
        if (on.device_type != TorchSharp.DeviceType.CUDA || !LoraWeightNorms.GroupedNorms || !LoraWeightNorms.LowRankNormKernel) return false;
        List<(LoraLinear layer, string adapter)> live;
        long current;
        lock (members)
        {
            if (filledStep == step) return false;
            filledStep = step;
            live = members.Select(m => m.layer.TryGetTarget(out var l) ? (l, m.adapter) : (null!, m.adapter)).Where(m => m.Item1 is not null).ToList();
            current = version;
        }
        if (plan is { } prepared && prepared.Version == current && Unchanged(prepared, variant, step))
        {
            if (!Run(prepared)) return false;
            foreach (var e in prepared.Entries) e.Dora.CacheNorm(e.Key with { Step = step }, e.Norm, e.Scale);
            return true;
        }
        using var scope = NewDisposeScope();
        var items = new List<LoraWeightNorms.LowRankNormItem>();
        var entries = new List<Entry>();
        foreach (var (layer, adapter) in live)
        {
            if (!InStep(layer, adapter, step) || layer.base_layer is not Linear { weight: { } w }
                || !torchx.same_device(w, on) || DoraVariant.TryLayer(layer, adapter) is not { } dora)
                continue;
            var key = variant.NormKeyOf(layer, adapter, step);
            if (dora.CachedNorm(key) is not null) continue;
            var m = dora.weight;
            var norm = Output(dora.StaleNorm(step), w);
            var scale = Output(dora.StaleScale(step), w);
            var item = new LoraWeightNorms.LowRankNormItem(w, layer.A(adapter), layer.B(adapter), layer.Scaling(adapter), norm, m, scale);
            if (!LoraWeightNorms.GroupedApplies(item)) continue;
            items.Add(item);
            entries.Add(new Entry(layer, adapter, dora, key with { Step = 0 }, norm, scale, torchx.data_ptr(w)));
        }
        // The old plan's item tables are freed: libtorch's stream must be past its side launch first.
        WaitPending();
        plan?.Dispose();
        plan = null;
        if (items.Count == 0 || Prepare(items, entries, current) is not { } made) return false;
        if (!Run(made))
        {
            made.Dispose();
            return false;
        }
        // The buffers become the members' cache (out of this scope), so the next step finds them as its stale norms.
        foreach (var e in entries) e.Dora.CacheNorm(e.Key with { Step = step }, e.Norm, e.Scale);
        plan = made;
        return true;
    }

    /// <summary>
    /// Before a member's norm or row scale is used on libtorch's stream: where the side launch computes it, makes the stream
    /// wait for that launch (once a step; later work is ordered after it).
    /// </summary>
    public void EnsureReady(DoraLinearLayer dora)
    {
        if (pending is null) return;
        lock (members)
            if (plan is { } p && p.RestMembers.Contains(dora))
                WaitPending();
    }

    // The launches for the items (LoraWeightNorms.GroupedBeside): the first eighth of the members (in attach order: the
    // model's first layers) on libtorch's stream, the rest on a side stream beside the first layers' forward, which
    // waits for it at the first use of one of them (EnsureReady); where streams are unavailable, or switched off, one.
    private static Plan? Prepare(List<LoraWeightNorms.LowRankNormItem> items, List<Entry> entries, long version)
    {
        var split = LoraWeightNorms.GroupedBeside && LoraWeightNorms.GroupedNormLaunch.BesideAvailable ? Math.Max(1, (items.Count + 7) / 8) : items.Count;
        if (split < items.Count)
        {
            var first = LoraWeightNorms.prepare_grouped_low_rank_row_norms(items.Take(split).ToList());
            var rest = first is null ? null : LoraWeightNorms.prepare_grouped_low_rank_row_norms(items.Skip(split).ToList());
            if (first is not null && rest is not null)
                return new Plan(entries, first, rest, new HashSet<DoraLinearLayer>(entries.Skip(split).Select(e => e.Dora), ReferenceEqualityComparer.Instance),
                    version);
            first?.Dispose();
        }
        return LoraWeightNorms.prepare_grouped_low_rank_row_norms(items) is { } all ? new Plan(entries, all, null, [], version) : null;
    }

    // Runs the first launch on libtorch's stream and the rest's on the side stream after everything enqueued so far (the
    // previous step's backward read these buffers; its optimizer step wrote A, B and m).
    private bool Run(Plan p)
    {
        if (!p.First.Run()) return false;
        if (p.Rest is not { } rest) return true;
        lock (members)
        {
            WaitPending();
            pending = rest.RunBeside();
            return pending is not null;
        }
    }

    // Makes libtorch's stream wait for the side launch not waited for yet.
    private void WaitPending()
    {
        pending?.Join();
        pending = null;
    }

    // Whether every member the plan covers is still as it was: in this step, active, its norm key unchanged but for the
    // step, W still in the storage the launch reads, and its cached norm and row scale still the plan's buffers (from the
    // previous step).
    private static bool Unchanged(Plan plan, DoraVariant variant, long step)
    {
        foreach (var e in plan.Entries)
        {
            if (!InStep(e.Layer, e.Adapter, step) || e.Layer.base_layer is not Linear { weight: { } w } || torchx.data_ptr(w) != e.Weight
                || !ReferenceEquals(e.Dora.StaleNorm(step), e.Norm)
                || !ReferenceEquals(e.Dora.StaleScale(step), e.Scale) || variant.NormKeyOf(e.Layer, e.Adapter, step) != (e.Key with { Step = step }))
                return false;
        }
        return true;
    }

    // Whether the adapter on the layer runs in this training step unmerged (its forward will want the step's norm).
    private static bool InStep(LoraLinear layer, string adapter, long step) =>
        layer.StepToken == step && layer.AdaptersEnabled && layer.ActiveAdapters.Contains(adapter) && !layer.MergedAdapters.Contains(adapter);

    // A stale buffer of the right shape for W's rows (fp32, on W's device), or a new one.
    private static Tensor Output(Tensor? stale, Tensor w) =>
        stale is not null && stale.dtype == ScalarType.Float32 && stale.dim() == 1 && stale.size(0) == w.size(0) && stale.is_contiguous()
        && torchx.same_device(stale, w)
            ? stale
            : empty([w.size(0)], ScalarType.Float32, w.device);
}
