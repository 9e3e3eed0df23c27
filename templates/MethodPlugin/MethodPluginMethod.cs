using LoRAHub.Abstractions;
using LoRAHub.Tuners;

namespace MethodPlugin;

/// <summary>
/// The factory the host finds in this assembly and users get by name: `Method("methodplugin")` in a script,
/// `--method methodplugin` on the command line. Keep the constructor cheap: the host creates every method at start-up.
/// </summary>
public sealed class MethodPluginMethod : AdapterMethod<MethodPluginOptions>
{
    public const string DisplayName = "MethodPlugin";

    /// <summary>adapter_config.json's peft_type for this method's folders.</summary>
    public const string PeftType = "METHODPLUGIN";

    public override string Name => "methodplugin";

    public override string Description => "MethodPlugin: learned per-input-feature scales on Linear layers, y = W·(x ⊙ s) (IA³-style)";

    public override IAdapter Attach(IAdaptableModel model, MethodPluginOptions options) => new MethodPluginAdapter(this, model, options);

    /// <summary>Reads what <see cref="MethodPluginAdapter.Save"/> wrote; keys and shapes must match the model.</summary>
    public override IAdapter Load(IAdaptableModel model, string directory)
    {
        var options = ConfigFile.Read<MethodPluginOptions>(Path.Combine(directory, AdapterFolder.PeftConfigFile));
        return Adapters.Build(new MethodPluginAdapter(this, model, options), adapter => adapter.LoadWeights(directory));
    }

    /// <summary>Lets the host load a folder without being told the method: ours have peft_type METHODPLUGIN.</summary>
    public override bool Claims(string directory) => AdapterFolder.PeftType(directory) == PeftType;
}
