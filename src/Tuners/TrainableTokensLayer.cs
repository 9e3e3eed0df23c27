using LoRAHub.TorchExtensions;
using TorchSharp;
using TorchSharp.Modules;
using TorchSharp.Utils;
using static TorchSharp.torch;

namespace LoRAHub.Tuners;

/// <summary>
/// PEFT's TrainableTokensLayer: only chosen rows (tokens) of an embedding table, or of an output head's weight, train;
/// per adapter it holds their trained values (PEFT's trainable_tokens_delta: the new rows themselves, not a difference)
/// and the original rows for unmerge. Forward takes the base output and puts the trained rows in (embedding: the
/// vectors of those tokens; head: the logits of those tokens), which equals running the base with the rows replaced.
/// The base module stays unregistered and its weight is registered here under the same name, so the model's parameter
/// names and state-dict keys do not change while the layer is in place. A layer made with <c>tied</c> (a tied lm_head
/// following the input embedding's layer) owns nothing and uses that layer's rows.
/// </summary>
public sealed class TrainableTokensLayer : nn.Module<Tensor, Tensor>
{
    private readonly nn.Module<Tensor, Tensor> baseModule;
    [ComponentName(Name = "weight")] private Parameter baseWeight; // registered as this module's "weight" (the base's parameter)
    private readonly TrainableTokensLayer? tied;
    private readonly Dictionary<string, Entry> entries = new();
    private readonly List<string> merged = new();
    private string? active;
    private Tensor? lookup; // token id → slot of the active adapter's rows, −1 elsewhere (embedding only)

    private sealed record Entry(Tensor Indices, Parameter Values, Tensor Original);

    public TrainableTokensLayer(nn.Module<Tensor, Tensor> baseModule, TrainableTokensLayer? tied = null) : base(nameof(TrainableTokensLayer))
    {
        if (baseModule is not (Embedding or Linear))
            throw new ArgumentException($"trainable tokens apply to an Embedding or a Linear output head; got a {baseModule.TypeName()}");
        if (baseModule is Linear { bias: not null })
            throw new ArgumentException("trainable tokens on a Linear head need a head without bias (PEFT computes its logits without one)");
        this.baseModule = baseModule;
        this.tied = tied;
        baseWeight = baseModule.get_parameter("weight") as Parameter
            ?? throw new ArgumentException($"the {baseModule.TypeName()} has no 'weight' parameter");
        register_parameter("weight", baseWeight);
        train(baseModule.training);
    }

    // Registration is explicit (the base's weight only): TorchSharp would otherwise register every field when the layer is
    // put into the model, the base module, the tied layer and the lookup table included.
    protected override void RegisterComponents() { }

    /// <summary>The wrapped module (PEFT's base_layer).</summary>
    public nn.Module<Tensor, Tensor> base_layer => baseModule;

    /// <summary>The layer whose rows this one follows (a tied head), or null.</summary>
    public TrainableTokensLayer? TiedTo => tied;

    /// <summary>The base table's dtype.</summary>
    public ScalarType WeightDType => baseWeight.dtype;

    public bool Has(string adapter) => (tied?.entries ?? entries).ContainsKey(adapter);

    /// <summary>Adds an adapter's rows, starting from the base's current values (PEFT's init_weights true).</summary>
    public void AddAdapter(string adapter, IReadOnlyList<long> indices, ScalarType dtype)
    {
        if (tied is not null) throw new InvalidOperationException("a tied trainable-tokens layer follows its embedding's rows; add them there");
        var rows = baseWeight.size(0);
        if (indices.Any(i => i < 0 || i >= rows))
            throw new ArgumentException($"trainable_token_indices: token id {indices.First(i => i < 0 || i >= rows)} is out of range for a table of {rows} rows");
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        var index = tensor(indices.ToArray(), ScalarType.Int64, baseWeight.device);
        var original = baseWeight.index_select(0, index);
        var values = new Parameter(original.to(dtype, copy: true), requires_grad: false);
        entries[adapter] = new Entry(index.DetachFromDisposeScope(), (Parameter)values.DetachFromDisposeScope(), original.clone().DetachFromDisposeScope());
    }

    public void RemoveAdapter(string adapter)
    {
        if (tied is not null) return;
        if (merged.Contains(adapter)) Unmerge();
        if (!entries.Remove(adapter, out var entry)) return;
        if (active == adapter) Active = null;
        entry.Indices.Dispose();
        entry.Values.Dispose();
        entry.Original.Dispose();
    }

    /// <summary>The adapter's token ids and trained rows (live: do not dispose).</summary>
    public (Tensor indices, Parameter values) Rows(string adapter)
    {
        var e = (tied?.entries ?? entries)[adapter];
        return (e.Indices, e.Values);
    }

    /// <summary>The adapter whose rows forward puts in (null: base output). One at a time, as PEFT.</summary>
    public string? Active
    {
        get => tied is not null ? tied.Active : active;
        set
        {
            if (tied is not null) return;
            if (value is not null && !entries.ContainsKey(value)) throw new KeyNotFoundException($"no trainable tokens for adapter '{value}'");
            if (value == active) return;
            active = value;
            lookup?.Dispose();
            lookup = null;
        }
    }

    /// <summary>True while an adapter's rows are written into the base weight.</summary>
    public bool Merged => tied?.Merged ?? merged.Count > 0;

    /// <summary>Writes the adapter's rows into the base weight (PEFT's merge). With <paramref name="safe"/>, non-finite rows are refused.</summary>
    public void Merge(string adapter, bool safe = false)
    {
        if (tied is not null || merged.Contains(adapter)) return;
        var entry = entries[adapter];
        if (merged.Count > 0 && merged.Any(m => entries[m].Indices.unsqueeze(1).eq(entry.Indices.unsqueeze(0)).any().item<bool>()))
            throw new InvalidOperationException($"the token rows of adapter '{adapter}' overlap those of a merged adapter; PEFT merges only disjoint rows");
        using var _ = no_grad();
        if (safe && !entry.Values.isfinite().all().item<bool>())
            throw new InvalidOperationException($"NaNs detected in the merged weights. The adapter {adapter} seems to be broken (trainable tokens)");
        baseWeight.index_copy_(0, entry.Indices, entry.Values.to(baseWeight.dtype));
        merged.Add(adapter);
    }

    /// <summary>Puts the original rows back, last merged first.</summary>
    public void Unmerge()
    {
        if (tied is not null) return;
        using var _ = no_grad();
        for (var i = merged.Count - 1; i >= 0; i--)
        {
            var entry = entries[merged[i]];
            baseWeight.index_copy_(0, entry.Indices, entry.Original);
        }
        merged.Clear();
    }

    public override Tensor forward(Tensor x)
    {
        var adapter = Active;
        if (adapter is null || Merged) return baseModule.call(x);
        var (indices, values) = Rows(adapter);
        using var scope = NewDisposeScope();
        var output = baseModule.call(x);
        if (baseModule is Linear)
        {
            // Logits of the trained tokens: x · rowsᵀ, in place of the base's columns.
            var columns = nn.functional.linear(x, values.to(x.dtype));
            return output.index_copy(-1, indices, columns.to(output.dtype)).MoveToOuterDisposeScope();
        }
        var slots = SlotTable(indices).index_select(0, x.reshape(-1)).view(x.shape);
        var picked = values.index_select(0, slots.clamp_min(0).reshape(-1)).view([.. x.shape, values.size(1)]);
        return where(slots.ge(0).unsqueeze(-1), picked.to(output.dtype), output).MoveToOuterDisposeScope();
    }

    private Tensor SlotTable(Tensor indices)
    {
        var owner = tied ?? this;
        if (owner.lookup is null || !torchx.same_device(owner.lookup, indices))
        {
            owner.lookup?.Dispose();
            using var scope = NewDisposeScope();
            var table = full(baseWeight.size(0), -1L, ScalarType.Int64, indices.device);
            table.index_copy_(0, indices, arange(indices.size(0), ScalarType.Int64, indices.device));
            owner.lookup = table.DetachFromDisposeScope();
        }
        return owner.lookup;
    }

    /// <summary>Every tensor this layer owns (values and originals), for parameter counts.</summary>
    public IEnumerable<Tensor> OwnedTensors => entries.Values.Select(e => (Tensor)e.Values);

    /// <summary>
    /// Frees what the layer owns once the base module is back in the model; the base weight is neither changed nor freed.
    /// </summary>
    public void Release()
    {
        this.replace_parameter("weight", new Parameter(empty(0), requires_grad: false));
        foreach (var e in entries.Values)
        {
            e.Indices.Dispose();
            e.Values.Dispose();
            e.Original.Dispose();
        }
        entries.Clear();
        lookup?.Dispose();
        lookup = null;
        Dispose();
    }
}
