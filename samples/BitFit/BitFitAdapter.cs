using LoRAHub.Abstractions;
using LoRAHub.Tuners;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Optim;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Samples.BitFit;

/// <summary>
/// BitFit on a live model. The trained tensors are the model's own parameters: disabling swaps the base values back in
/// (kept from attach time) so the model computes exactly its base output; MergeAndUnload keeps the trained values,
/// Unload the base ones. Files go through the tuner kit (adapter_config.json from the options' config fields).
/// </summary>
public sealed class BitFitAdapter : IAdapter
{
    private readonly IAdaptableModel model;
    private readonly Dictionary<string, Tensor> trained;
    // While enabled: the base values. While disabled: the trained values. Swapping them toggles the adapter.
    private readonly Dictionary<string, Tensor> swapped;
    private readonly Dictionary<Tensor, bool> requiresGradBefore;
    private bool enabled = true;
    private bool released;

    public BitFitAdapter(IAdapterMethod method, IAdaptableModel model, BitFitOptions options)
    {
        Method = method;
        Options = options;
        this.model = model;
        trained = SelectTrainable(model, options);
        if (trained.Count == 0)
            throw new AdapterConfigurationException(
                $"BitFit found nothing to train in {model.ModelType} (TrainBiases={options.TrainBiases}, TrainNorms={options.TrainNorms}); " +
                "enable TrainNorms for bias-free models such as Llama");

        // By reference: a Tensor's Equals compares values.
        requiresGradBefore = new Dictionary<Tensor, bool>(ReferenceEqualityComparer.Instance);
        foreach (var p in model.Root.parameters()) requiresGradBefore[p] = p.requires_grad;
        using (torch.no_grad())
        {
            swapped = trained.ToDictionary(kv => kv.Key, kv => kv.Value.detach().clone().DetachFromDisposeScope());
        }
        foreach (var p in requiresGradBefore.Keys) p.requires_grad = false;
        foreach (var p in trained.Values) p.requires_grad = true;
    }

    public IAdapterMethod Method { get; }
    public object Options { get; }

    public long ModelParameterCount => model.Root.parameters().Sum(p => p.numel());

    public IReadOnlyList<ParamGroup> ParameterGroups(double learningRate, double weightDecay) =>
        [new ParamGroup(trained.Values, learningRate, weightDecay, "bitfit")];

    public bool Enabled
    {
        get => enabled;
        set
        {
            if (value == enabled) return;
            using var _ = torch.no_grad();
            foreach (var (name, parameter) in trained)
            {
                using var current = parameter.clone();
                parameter.copy_(swapped[name]);
                swapped[name].copy_(current);
            }
            enabled = value;
        }
    }

    /// <summary>The trained values by parameter name (the model's names), whether or not the adapter is enabled.</summary>
    public IReadOnlyDictionary<string, Tensor> StateDict() => enabled ? trained : swapped;

    public void Save(string directory)
    {
        Directory.CreateDirectory(directory);
        ConfigFile.Write(Path.Combine(directory, AdapterFolder.PeftConfigFile), Options, ConfigFields.Of(typeof(BitFitOptions)), new Dictionary<string, object?>
        {
            ["peft_type"] = BitFitMethod.PeftType, ["base_model_name_or_path"] = model.NameOrPath, ["model_type"] = model.ModelType,
        });
        AdapterWeightsFile.Write(Path.Combine(directory, AdapterWeightsFile.FileName), StateDict());
    }

    /// <summary>The model with the trained values, the adapter dropped.</summary>
    public IAdaptableModel MergeAndUnload()
    {
        Dispose();
        return model;
    }

    /// <summary>The model with its base values back, the adapter dropped.</summary>
    public IAdaptableModel Unload()
    {
        Enabled = false;
        Release();
        return model;
    }

    /// <summary>Copies saved values into the trained tensors; the key sets must match exactly.</summary>
    internal void LoadTrained(IReadOnlyDictionary<string, Tensor> saved)
    {
        var missing = trained.Keys.Except(saved.Keys).ToList();
        var unexpected = saved.Keys.Except(trained.Keys).ToList();
        if (missing.Count > 0 || unexpected.Count > 0)
            throw new AdapterConfigurationException(
                $"saved BitFit tensors do not match the model: missing [{string.Join(", ", missing)}], unexpected [{string.Join(", ", unexpected)}]");
        using var _ = torch.no_grad();
        foreach (var (name, target) in StateDict())
        {
            if (!saved[name].shape.SequenceEqual(target.shape))
                throw new AdapterConfigurationException($"shape mismatch for '{name}': saved {Shape(saved[name])}, model {Shape(target)}");
            target.copy_(saved[name]);
        }
    }

    /// <summary>Restores which parameters required gradients; the trained values stay in the model.</summary>
    public void Dispose()
    {
        if (released) return;
        Enabled = true;
        Release();
    }

    private void Release()
    {
        released = true;
        foreach (var (p, requiresGrad) in requiresGradBefore) p.requires_grad = requiresGrad;
        foreach (var t in swapped.Values) t.Dispose();
        swapped.Clear();
    }

    private static string Shape(Tensor t) => "[" + string.Join(", ", t.shape) + "]";

    private static Dictionary<string, Tensor> SelectTrainable(IAdaptableModel model, BitFitOptions options)
    {
        var result = new Dictionary<string, Tensor>();
        // TorchSharp's named_modules leaves out the root, whose own parameters count too.
        foreach (var (path, module) in model.Root.named_modules().Prepend(("", model.Root)))
        {
            // Norm layers are recognised by type name so that model-specific norms (LlamaRMSNorm) count too.
            var isNorm = module.TypeName().EndsWith("Norm", StringComparison.OrdinalIgnoreCase);
            foreach (var (name, parameter) in module.named_parameters(recurse: false))
            {
                if ((options.TrainBiases && name == "bias") || (options.TrainNorms && isNorm && name == "weight"))
                    result[path.Length == 0 ? name : $"{path}.{name}"] = parameter;
            }
        }
        return result;
    }
}
