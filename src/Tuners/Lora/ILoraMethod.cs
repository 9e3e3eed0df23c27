namespace LoRAHub.Tuners.Lora;

/// <summary>
/// A method whose adapters are the tuner kit's <see cref="LoraAdapter"/> (LoRA and the methods built on it: DoRA, QLoRA,
/// LongLoRA). Its folders can join a LoRA adapter set that another such method owns (the host's mixed batches; PEFT too
/// holds LoRA and DoRA adapters side by side in one model), once the set accepts the <see cref="LoraVariants"/> the
/// method reads (<see cref="LoraAdapter.AcceptVariants"/>). Plugins stay apart: the host, not a plugin, brings the two together.
/// </summary>
public interface ILoraMethod
{
    /// <summary>The LoRA variants this method's folders may set (DoRA's use_dora); none for plain LoRA.</summary>
    IReadOnlyList<ILoraVariant> LoraVariants => [];
}
