namespace LoRAHub.Abstractions;

/// <summary>
/// An adaptation method (LoRA, DoRA, QLoRA, GaLore, ...). A plugin assembly exports one or more public
/// non-abstract classes implementing this interface with a public parameterless constructor.
/// The method is a factory: <see cref="Attach"/> applies it to a model and returns the live <see cref="IAdapter"/>.
/// </summary>
public interface IAdapterMethod
{
    /// <summary>The name users pass to the host ("lora", "dora", ...); case-insensitive, unique among plugins.</summary>
    string Name { get; }

    /// <summary>One line for `loraHub methods`.</summary>
    string Description { get; }

    /// <summary>The typed options class (public settable properties; bound from a script object or JSON).</summary>
    Type OptionsType { get; }

    /// <summary>A new options object with the method's defaults.</summary>
    object CreateDefaultOptions();

    /// <summary>
    /// Applies the method to the model: freezes what must stay frozen, injects layers, transforms base weights or
    /// prepares optimizer-side state. Throws <see cref="AdapterConfigurationException"/> for bad options.
    /// </summary>
    IAdapter Attach(IAdaptableModel model, object options);

    /// <summary>Loads a saved adapter (from <see cref="IAdapter.Save"/>) onto a model.</summary>
    IAdapter Load(IAdaptableModel model, string directory);

    /// <summary>
    /// Whether a saved folder is this method's, from its files alone (adapter_config.json's peft_type and telltale
    /// fields, a method's own config file): what lets a folder load without naming its method. Methods that share a
    /// format must not both claim a folder (LoRA, DoRA, QLoRA and LongLoRA all write peft_type LORA: DoRA claims
    /// use_dora, QLoRA qlora_config.json, LongLoRA longlora_config.json, LoRA the rest). False by default.
    /// </summary>
    bool Claims(string directory) => false;

    /// <summary>
    /// Whether <see cref="Load"/> rewrites the base weights themselves (GaLore, full fine-tuning) rather than adding
    /// layers beside them: such an adapter can be neither disabled nor unloaded, so the base model is gone once it is
    /// loaded (a server refuses it beside the base model). False by default.
    /// </summary>
    bool ChangesBaseWeights => false;
}

/// <summary>Convenience base class that gives plugins typed options.</summary>
public abstract class AdapterMethod<TOptions> : IAdapterMethod where TOptions : class, new()
{
    public abstract string Name { get; }
    public abstract string Description { get; }
    public Type OptionsType => typeof(TOptions);
    public object CreateDefaultOptions() => new TOptions();

    public IAdapter Attach(IAdaptableModel model, object options) => options switch
    {
        TOptions typed => Attach(model, typed),
        null => Attach(model, new TOptions()),
        _ => Attach(model, OptionsBinder.Bind<TOptions>(options)),
    };

    public abstract IAdapter Attach(IAdaptableModel model, TOptions options);
    public abstract IAdapter Load(IAdaptableModel model, string directory);

    /// <inheritdoc cref="IAdapterMethod.Claims"/>
    public virtual bool Claims(string directory) => false;
    /// <inheritdoc cref="IAdapterMethod.ChangesBaseWeights"/>
    public virtual bool ChangesBaseWeights => false;
}

/// <summary>Bad method options or a model the method cannot handle; the message names the option and the fix.</summary>
public sealed class AdapterConfigurationException(string message) : Exception(message);
