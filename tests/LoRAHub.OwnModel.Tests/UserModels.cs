namespace LoRAHub.OwnModel.Tests;

/// <summary>
/// Models a TorchSharp user writes without LoRAHub, each with a toy task: a Sequential MLP built from TorchSharp's
/// factories alone, and the sample's decoder (samples/OwnModel/TinyTransformer.cs). Weights and data are drawn on the CPU
/// after manual_seed and then moved, as a PyTorch user writes Model().to(device): TorchSharp's manual_seed seeds only the
/// CPU generator, so values drawn on a GPU would differ between two builds with the same seed.
/// </summary>
internal sealed record UserModel(
    string Kind,
    Func<long, Device, nn.Module<Tensor, Tensor>> Build,
    Func<Device, (Tensor input, Tensor target)> Data,
    Func<Tensor, Tensor, Tensor> Loss,
    string[] Targets,
    string[] Heads)
{
    public static UserModel Get(string kind) => kind switch
    {
        "mlp" => Mlp,
        "transformer" => Transformer,
        _ => throw new ArgumentException(kind),
    };

    /// <summary>Regression onto a fixed random teacher; the last Linear ("out") is the head.</summary>
    public static readonly UserModel Mlp = new(
        "mlp",
        (seed, device) =>
        {
            torchx.manual_seed(seed);
            return nn.Sequential(
                ("fc1", nn.Linear(8, 32)),
                ("act1", nn.ReLU()),
                ("fc2", nn.Linear(32, 32)),
                ("act2", nn.ReLU()),
                ("out", nn.Linear(32, 4))).to(device);
        },
        device =>
        {
            torchx.manual_seed(7);
            var x = randn(64, 8);
            return (x.to(device), x.matmul(randn(8, 4)).sin().to(device));
        },
        (output, target) => nn.functional.mse_loss(output, target),
        ["fc1", "fc2"],
        ["out"]);

    /// <summary>Next-token prediction of sequences counting up in steps of 3.</summary>
    public static readonly UserModel Transformer = new(
        "transformer",
        (seed, device) => new TinyTransformer(new TinyTransformer.Config(), seed, device),
        device =>
        {
            var vocab = new TinyTransformer.Config().Vocab;
            torchx.manual_seed(7);
            var sequences = (randint(vocab, [8, 1]) + 3 * arange(13)).remainder(vocab).to(device);
            return (sequences[.., ..12], sequences[.., 1..]);
        },
        (logits, target) => nn.functional.cross_entropy(logits.reshape(-1, logits.size(-1)), target.reshape(-1)),
        ["q_proj", "v_proj", "fc1", "fc2"],
        ["head"]);
}
