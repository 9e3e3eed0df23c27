namespace LoRAHub.Host.Tests;

/// <summary>
/// The opening of the scripts that the plugin tests run through the host: a user's own 2-layer MLP of plain TorchSharp
/// modules, handed to methods through <c>TorchSharpModel.Wrap</c>, and the short training loop they all use.
/// </summary>
internal static class ScriptModels
{
    public const string Mlp = """
        sealed class Mlp : nn.Module<Tensor, Tensor>
        {
            private readonly nn.Module<Tensor, Tensor> fc1, fc2;
            public Mlp(int inputs, int hidden) : base("Mlp")
            {
                fc1 = nn.Linear(inputs, hidden);
                fc2 = nn.Linear(hidden, 1);
                RegisterComponents();
            }
            public override Tensor forward(Tensor x)
            {
                using var h = fc1.call(x);
                using var a = h.relu();
                return fc2.call(a);
            }
        }

        IAdaptableModel Adaptable(Mlp net, params string[] heads) =>
            TorchSharpModel.Wrap(net, name: "test-mlp", modelType: "mlp", outputModules: heads);

        // 30 AdamW steps on the mean squared error, printing the first and last loss.
        void Fit(Mlp net, IAdapter adapter, Tensor x, Tensor y, double lr)
        {
            using var optimizer = new AdamW(adapter.ParameterGroups(lr, 0.0));
            for (var step = 0; step < 30; step++)
            {
                using var prediction = net.call(x);
                using var loss = torch.nn.functional.mse_loss(prediction, y);
                loss.backward();
                optimizer.step();
                optimizer.zero_grad();
                if (step == 0 || step == 29) Output($"loss {step} {loss.ToSingle()}");
            }
        }

        """;
}
