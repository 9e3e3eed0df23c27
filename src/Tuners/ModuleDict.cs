using TorchSharp;

namespace LoRAHub.Tuners;

/// <summary>
/// Children keyed by adapter name (torch.nn.ModuleDict), so parameter paths read "lora_A.default.weight" as in PEFT.
/// TorchSharp's ModuleDict&lt;T&gt; registers its entries once, when its parent registers it; adapters come and go later.
/// </summary>
public sealed class ModuleDict() : torch.nn.Module(nameof(ModuleDict))
{
    private readonly Dictionary<string, torch.nn.Module> items = new();

    public torch.nn.Module this[string key] => items.TryGetValue(key, out var m) ? m : throw new KeyNotFoundException($"no entry '{key}'");

    public bool ContainsKey(string key) => items.ContainsKey(key);

    public IEnumerable<string> Keys => items.Keys;

    /// <summary>Adds an entry, or replaces one (the replaced module is disposed: the dict owns its entries).</summary>
    public void Set(string key, torch.nn.Module module)
    {
        if (items.Remove(key, out var old))
        {
            register_module(key, null!);
            if (!ReferenceEquals(old, module)) old.Dispose();
        }
        register_module(key, module);
        items[key] = module;
    }

    /// <summary>Removes an entry and disposes it; false when there is none.</summary>
    public bool Remove(string key)
    {
        if (!items.Remove(key, out var old)) return false;
        register_module(key, null!);
        old.Dispose();
        return true;
    }
}
