using LoRAHub.TorchExtensions;
using TorchSharp;
using TorchSharp.Modules;
using static TorchSharp.torch;

namespace LoRAHub.Tuners;

/// <summary>
/// A modules_to_save entry (PEFT's ModulesToSaveWrapper without the wrapper): the module keeps its type and place in the
/// model (so code that casts it still works); its parameters are swapped between the frozen originals and a trainable
/// copy per adapter.
/// </summary>
public sealed class SavedModule
{
    private readonly List<(nn.Module owner, string name, string key)> slots = new();
    private readonly Parameter[] originals;
    private readonly Dictionary<string, Parameter[]> copies = new();

    public SavedModule(string path, nn.Module module)
    {
        Path = path;
        Module = module;
        var list = new List<Parameter>();
        foreach (var (sub, m) in module.named_modules().Prepend(("", module)))
            foreach (var (name, p) in m.named_parameters(recurse: false))
            {
                slots.Add((m, name, sub.Length == 0 ? name : sub + "." + name));
                list.Add(p);
            }
        originals = list.ToArray();
    }

    public string Path { get; }
    public nn.Module Module { get; }

    public bool Has(string adapter) => copies.ContainsKey(adapter);

    /// <summary>Parameter names relative to the module ("weight", "bias", "sub.weight").</summary>
    public IEnumerable<string> Keys => slots.Select(s => s.key);

    public void AddCopy(string adapter)
    {
        using var _ = no_grad();
        using var scope = NewDisposeScope();
        copies[adapter] = originals.Select(o => (Parameter)new Parameter(o.clone(), requires_grad: false).DetachFromDisposeScope()).ToArray();
    }

    /// <summary>Frees the adapter's copies (PEFT's delete_adapter); the module keeps the originals if it held them.</summary>
    public void RemoveCopy(string adapter)
    {
        if (!copies.Remove(adapter, out var removed)) return;
        var live = Module.parameters().ToHashSet(ReferenceEqualityComparer.Instance);
        if (removed.Any(live.Contains)) Use(null);
        foreach (var t in removed) t.Dispose();
    }

    /// <summary>True when no adapter has a copy.</summary>
    public bool IsEmpty => copies.Count == 0;

    /// <summary>The adapter's copies by relative key.</summary>
    public IEnumerable<(string key, Parameter tensor)> Copies(string adapter) => slots.Select((s, i) => (s.key, copies[adapter][i]));

    /// <summary>Puts the adapter's copies (trainable) or, for null or an adapter without copies, the frozen originals in place.</summary>
    public void Use(string? adapter)
    {
        var set = adapter is not null && copies.TryGetValue(adapter, out var c) ? c : null;
        for (var i = 0; i < slots.Count; i++)
        {
            var p = set?[i] ?? originals[i];
            slots[i].owner.replace_parameter(slots[i].name, p);
            p.requires_grad = set is not null;
        }
        foreach (var (name, other) in copies)
            if (name != adapter) foreach (var t in other) t.requires_grad = false;
    }

    public IEnumerable<Parameter> AllTensors => originals.Concat(copies.Values.SelectMany(c => c));

    /// <summary>
    /// Keeps <paramref name="adapter"/>'s copies in the module for good (merge_and_unload: the trained module is part of
    /// the plain model), frozen; frees the other copies and the originals the model no longer holds.
    /// </summary>
    public void Commit(string adapter, nn.Module root)
    {
        if (!copies.TryGetValue(adapter, out var kept))
        {
            Unload();
            return;
        }
        Use(adapter);
        foreach (var t in kept) t.requires_grad = false;
        copies.Remove(adapter);
        // An original may still be held elsewhere (a tied weight): only those the model no longer reaches are freed.
        var live = root.parameters().ToHashSet(ReferenceEqualityComparer.Instance);
        foreach (var t in originals.Where(o => !live.Contains(o))) t.Dispose();
        foreach (var t in copies.Values.SelectMany(c => c)) t.Dispose();
        copies.Clear();
    }

    /// <summary>Restores the originals and frees the copies.</summary>
    public void Unload()
    {
        Use(null);
        foreach (var t in copies.Values.SelectMany(c => c)) t.Dispose();
        copies.Clear();
    }
}
