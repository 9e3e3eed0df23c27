using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions.Optim;
using LoRAHub.Tuners;
using TorchSharp;
using static TorchSharp.torch;

namespace MethodPlugin;

/// <summary>
/// The method on one model. BaseTuner (PEFT's BaseTuner) does the shared work: wrapping the selected layers, the
/// enabled switch and DisableAdapter scope, Merge/Unmerge, MergeAndUnload, Unload, and disposal (which unloads).
/// This class picks the targets, freezes the base, and names its parameters and files.
/// </summary>
public sealed class MethodPluginAdapter : BaseTuner<MethodPluginLayer>
{
    private readonly MethodPluginOptions options;
    private readonly TargetModuleSpec targets;

    public MethodPluginAdapter(IAdapterMethod method, IAdaptableModel model, MethodPluginOptions options) : base(method, model)
    {
        options.Validate();
        this.options = options;
        // One target selection for every method: names, regex, all-linear, exclude_modules, layers_to_transform.
        targets = TargetResolver.EffectiveTargets(model, options.TargetModules, MethodPluginMethod.DisplayName);
        var paths = TargetResolver.Resolve(model, options.Selection(targets), MethodPluginMethod.DisplayName);
        FreezeBase();
        InjectAll(paths, (_, baseLayer) => new MethodPluginLayer(baseLayer));
    }

    public override object Options => options;

    public override IReadOnlyList<ParamGroup> ParameterGroups(double learningRate, double weightDecay) =>
        [new ParamGroup(Layers.Values.Select(l => (Tensor)l.scale), learningRate, 0.0, "scales")];

    /// <summary>"base_model.model.&lt;path&gt;.scale" for every adapted layer (PEFT's key style).</summary>
    public override IReadOnlyDictionary<string, Tensor> StateDict() =>
        Layers.ToDictionary(kv => PeftKeys.Parameter(kv.Key + ".scale"), kv => (Tensor)kv.Value.scale);

    /// <summary>adapter_config.json (peft_type and the options' config fields) and adapter_model.safetensors, each written atomically.</summary>
    public override void Save(string directory)
    {
        CheckLive();
        Directory.CreateDirectory(directory);
        // Every option as attached (an option you add is saved with no change here); target_modules as resolved for this model.
        var saved = new MethodPluginOptions();
        ConfigFields.Copy(options, saved, typeof(MethodPluginOptions));
        saved.TargetModules = targets;
        ConfigFile.Write(Path.Combine(directory, AdapterFolder.PeftConfigFile), saved, ConfigFields.Of(typeof(MethodPluginOptions)), new Dictionary<string, object?>
        {
            ["peft_type"] = MethodPluginMethod.PeftType,
            ["base_model_name_or_path"] = Model.NameOrPath,
        });
        AdapterWeightsFile.Write(Path.Combine(directory, AdapterWeightsFile.FileName), StateDict());
    }
}
