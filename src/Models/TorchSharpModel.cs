using LoRAHub.Abstractions;
using LoRAHub.TorchExtensions;
using TorchSharp;
using static TorchSharp.torch;

namespace LoRAHub.Models;

/// <summary>
/// Lets a model written with plain TorchSharp modules take adapter methods (LoRA, DoRA, ...) through the same
/// <see cref="IAdapterMethod"/> as our own models. It is a view of the user's module tree, not a copy and not an owner:
/// the caller keeps calling (and disposing) its own model; adapters swap children inside that tree.
/// <para>
/// What the model must do: hold every layer an adapter may wrap in a field typed <c>Module&lt;Tensor, Tensor&gt;</c> (not
/// <c>Linear</c>), or in a <c>Sequential</c> / <c>ModuleList&lt;Module&lt;Tensor, Tensor&gt;&gt;</c>, and call that field in
/// forward; register it with <c>RegisterComponents()</c>. Paths are TorchSharp's dotted names ("blocks.0.attn.q_proj").
/// </para>
/// </summary>
public sealed class TorchSharpModel : IAdaptableModel
{
    private readonly Device? device;
    private readonly ScalarType? dtype;

    private TorchSharpModel(nn.Module root, Device? device, ScalarType? dtype, string name, string modelType, IReadOnlyList<string> outputModules)
    {
        Root = root;
        this.device = device;
        this.dtype = dtype;
        NameOrPath = name;
        ModelType = modelType;
        OutputModuleNames = outputModules;
    }

    /// <summary>
    /// Wraps <paramref name="root"/> for adapter methods.
    /// </summary>
    /// <param name="root">The user's model (any <see cref="nn.Module"/>, e.g. a Sequential or a custom Module&lt;Tensor, Tensor&gt;).</param>
    /// <param name="device">Where the model lives; null: wherever its first parameter is, read at each call (so moves show).</param>
    /// <param name="dtype">The frozen weights' dtype; null: the first floating-point parameter's, read at each call.</param>
    /// <param name="name">Recorded as base_model_name_or_path in saved adapter configs; null: the root's type name.</param>
    /// <param name="modelType">
    /// config.json's model_type; methods use it for default targets (PEFT has defaults for "llama", none for a custom model,
    /// so pass target_modules). Null: the root's type name in lower case.
    /// </param>
    /// <param name="outputModules">Dotted paths of output heads, which "all-linear" targeting leaves alone (e.g. "lm_head").</param>
    /// <exception cref="ArgumentException">An output module path names no module of <paramref name="root"/>.</exception>
    public static TorchSharpModel Wrap(nn.Module root, Device? device = null, ScalarType? dtype = null, string? name = null,
        string? modelType = null, IEnumerable<string>? outputModules = null)
    {
        ArgumentNullException.ThrowIfNull(root);
        var heads = outputModules?.ToList() ?? [];
        foreach (var path in heads)
            if (root.get_submodule(path) is null)
                throw new ArgumentException($"output module '{path}' is not a module of {root.TypeName()}; children: " +
                    string.Join(", ", root.named_children().Select(c => c.name)), nameof(outputModules));
        var typeName = root.TypeName();
        return new TorchSharpModel(root, device, dtype, name ?? typeName, modelType ?? typeName.ToLowerInvariant(), heads);
    }

    public nn.Module Root { get; }

    public Device Device => device ?? Root.parameters().FirstOrDefault()?.device ?? CPU;

    public ScalarType DType => dtype ?? Root.parameters().Select(p => p.dtype).FirstOrDefault(t => is_floating_point(t), ScalarType.Float32);

    public string ModelType { get; }

    public string NameOrPath { get; }

    public IReadOnlyList<string> OutputModuleNames { get; }

    /// <summary>
    /// Our decoders' attention by default (fused causal SDPA; padding keys masked). Only a model whose forward calls this
    /// delegate sees a method replace it (LongLoRA's shifted attention); a model that calls TorchSharp's
    /// scaled_dot_product_attention itself keeps its own attention.
    /// </summary>
    public AttentionFunction Attention { get; set; } = Llama.LlamaForCausalLM.DefaultAttention;

    public override string ToString() => $"{NameOrPath} ({ModelType}, {DType} on {Device})";
}
