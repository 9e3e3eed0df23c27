using LoRAHub.Torch;
using LoRAHub.Torch.NN;

namespace LoRAHub.Plugins.LoRA;

/// <summary>
/// A modules_to_save entry: the module keeps its type and place in the model (so code that casts it still works);
/// its parameters are swapped between the frozen originals and a trainable copy per adapter.
/// </summary>
internal sealed class SavedModule
{
    private readonly List<(Module owner, string name, string key)> slots = new();
    private readonly Tensor[] originals;
    private readonly Dictionary<string, Tensor[]> copies = new();

    public SavedModule(string path, Module module)
    {
        Path = path;
        Module = module;
        var list = new List<Tensor>();
        foreach (var (sub, m) in module.named_modules())
            foreach (var (name, p) in m.named_parameters(recurse: false))
            {
                slots.Add((m, name, sub.Length == 0 ? name : sub + "." + name));
                list.Add(p);
            }
        originals = list.ToArray();
    }

    public string Path { get; }
    public Module Module { get; }

    public bool Has(string adapter) => copies.ContainsKey(adapter);

    /// <summary>Parameter names relative to the module ("weight", "bias", "sub.weight").</summary>
    public IEnumerable<string> Keys => slots.Select(s => s.key);

    public void AddCopy(string adapter)
    {
        using var _ = torch.no_grad();
        copies[adapter] = originals.Select(o => o.clone().DetachFromDisposeScope()).ToArray();
    }

    /// <summary>The adapter's copies by relative key.</summary>
    public IEnumerable<(string key, Tensor tensor)> Copies(string adapter) => slots.Select((s, i) => (s.key, copies[adapter][i]));

    /// <summary>Puts the adapter's copies (trainable) or, for null or an adapter without copies, the frozen originals in place.</summary>
    public void Use(string? adapter)
    {
        var set = adapter != null && copies.TryGetValue(adapter, out var c) ? c : null;
        for (var i = 0; i < slots.Count; i++)
            slots[i].owner.register_parameter(slots[i].name, set?[i] ?? originals[i], requires_grad: set != null);
        foreach (var (name, other) in copies)
            if (name != adapter) foreach (var t in other) t.requires_grad = false;
    }

    public IEnumerable<Tensor> AllTensors => originals.Concat(copies.Values.SelectMany(c => c));

    /// <summary>Restores the originals and frees the copies.</summary>
    public void Unload()
    {
        Use(null);
        foreach (var t in copies.Values.SelectMany(c => c)) t.Dispose();
        copies.Clear();
    }
}
