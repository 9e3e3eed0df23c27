using LoRAHub.Torch.NN;

namespace LoRAHub.Plugins.LoRA;

/// <summary>Children keyed by adapter name (torch.nn.ModuleDict), so parameter paths read "lora_A.default.weight" as in PEFT.</summary>
public sealed class ModuleDict() : Module("ModuleDict")
{
    private readonly Dictionary<string, Module> items = new();

    public Module this[string key] => items.TryGetValue(key, out var m) ? m : throw new KeyNotFoundException($"no entry '{key}'");

    public bool ContainsKey(string key) => items.ContainsKey(key);

    public IEnumerable<string> Keys => items.Keys;

    /// <summary>Adds or replaces an entry.</summary>
    public void Set(string key, Module module)
    {
        register_module(key, module);
        items[key] = module;
    }
}
