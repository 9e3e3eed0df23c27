using System.Text.Json;
using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using LoRAHub.TorchExtensions.Optim;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Plugins.MALoRA;

/// <summary>MALoRA on one model: the expert layers, the router's load-balancing loss, save and load.</summary>
public sealed class MaLoraAdapter : IAdapter
{
    internal const string ConfigFile = "malora_config.json";
    internal const string WeightsFile = "adapter_model.safetensors";
    internal static readonly JsonSerializerOptions Json = new()
    {
        WriteIndented = true, PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower, PropertyNameCaseInsensitive = true,
    };

    private readonly IAdaptableModel model;
    private readonly MaLoraOptions options;
    private readonly List<(string path, MaLoraLinear layer)> layers;
    private bool enabled = true;

    internal MaLoraAdapter(IAdapterMethod method, IAdaptableModel model, MaLoraOptions options)
    {
        Method = method;
        this.model = model;
        this.options = options;
        var paths = ResolveTargets(model, options.EffectiveTargets);
        foreach (var p in model.Root.parameters()) p.requires_grad_(false);
        layers = paths.Select(path =>
        {
            var layer = new MaLoraLinear(model.Root.get_submodule(path)!, options);
            layer.train(model.Root.training);
            model.Root.replace_submodule(path, layer);
            return (path, layer);
        }).ToList();
    }

    public IAdapterMethod Method { get; }

    public object Options => options;

    public IReadOnlyList<(string path, MaLoraLinear layer)> Layers => layers;

    public bool Enabled
    {
        get => enabled;
        set
        {
            enabled = value;
            foreach (var (_, l) in layers) l.Enabled = value;
        }
    }

    public IReadOnlyList<ParamGroup> ParameterGroups(double learningRate, double weightDecay) =>
        [new ParamGroup(layers.SelectMany(l => new[] { l.layer.S, l.layer.P, l.layer.B, l.layer.Router }), learningRate, weightDecay, "decay")];

    /// <summary>router_aux_loss_coef · mean over layers of their load-balancing terms from the last forward (training only).</summary>
    public Tensor? AuxiliaryLoss()
    {
        var terms = layers.Select(l => l.layer.LastBalanceLoss).Where(t => t is not null).Cast<Tensor>().ToList();
        if (!enabled || terms.Count == 0) return null;
        using var scope = torch.NewDisposeScope();
        return torch.stack(terms).mean().mul(options.RouterAuxLossCoef).MoveToOuterDisposeScope();
    }

    public IReadOnlyDictionary<string, Tensor> StateDict() =>
        layers.SelectMany(l => new[] { ("lora_S", l.layer.S), ("lora_P", l.layer.P), ("lora_B", l.layer.B), ("router", l.layer.Router) }
            .Select(p => (key: $"base_model.model.{l.path}.{p.Item1}.weight", tensor: p.Item2))).ToDictionary(p => p.key, p => p.tensor);

    /// <summary>adapter_model.safetensors (the experts, routers and shared subspaces) and malora_config.json (the options).</summary>
    public void Save(string directory)
    {
        Directory.CreateDirectory(directory);
        torchx.save_safetensors(StateDict(), Path.Combine(directory, WeightsFile), new Dictionary<string, string> { ["format"] = "pt" });
        var path = Path.Combine(directory, ConfigFile);
        File.WriteAllText(path + ".tmp", JsonSerializer.Serialize(options, Json));
        File.Move(path + ".tmp", path, overwrite: true);
    }

    /// <summary>Routing depends on the input, so the experts cannot be folded into the base weight.</summary>
    public bool CanMerge => false;

    public long ModelParameterCount => model.Root.parameters().Sum(p => p.numel());

    /// <summary>Puts the original Linear layers back and frees the experts.</summary>
    public void Dispose()
    {
        foreach (var (path, l) in layers)
        {
            model.Root.replace_submodule(path, l.Unwrap());
            l.Dispose();
        }
        layers.Clear();
    }

    private static List<string> ResolveTargets(IAdaptableModel model, List<string> names)
    {
        var (paths, linears) = LinearTargets.Match(model.Root, names, model.OutputModuleNames);
        if (paths.Count == 0)
            throw MaLoraOptions.Bad("target_modules", $"[{string.Join(", ", names)}] matches no Linear layer; Linear layers here: {LinearTargets.Describe(linears)}");
        return paths;
    }
}
