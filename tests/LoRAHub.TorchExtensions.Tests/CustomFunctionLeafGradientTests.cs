namespace LoRAHub.TorchExtensions.Tests;

/// <summary>
/// <see cref="CustomFunction.AccumulateLeafGradients"/>: inside the scope a custom function's parameter gradients become
/// the parameters' .grad without libtorch's copy, with the values AccumulateGrad gives (first and accumulated), and only
/// where that is safe; outside it (torch.autograd.grad included) nothing changes. In CustomFunctionTests' collection: the
/// scope is process-wide, so no test may run beside it.
/// </summary>
[Collection(nameof(CustomFunctionTests))]
public class CustomFunctionLeafGradientTests
{
    private static readonly Device Dev = TestDevice.Current;

    /// <summary>y = w ⊙ x (w a parameter); backward returns new tensors and remembers where w's gradient lives.</summary>
    private sealed class Weighted : CustomFunction
    {
        private Tensor? x, w;
        public IntPtr WeightGradient { get; private set; }

        protected override string name => "weighted";

        protected override Tensor[] forward(Tensor?[] inputs)
        {
            (x, w) = (save(inputs[0]!), save(inputs[1]!));
            return [inputs[0]! * inputs[1]!];
        }

        protected override Tensor?[] backward(Tensor[] grad_outputs)
        {
            var gw = grad_outputs[0] * x!;
            WeightGradient = torchx.data_ptr(gw);
            return [grad_outputs[0] * w!, gw];
        }
    }

    /// <summary>y = x + w1 + w2 (w1, w2 parameters); backward returns one tensor as both parameters' gradient (aliases).</summary>
    private sealed class SharedGradient : CustomFunction
    {
        protected override string name => "shared_gradient";

        protected override Tensor[] forward(Tensor?[] inputs) => [inputs[0]! + inputs[1]! + inputs[2]!];

        protected override Tensor?[] backward(Tensor[] grad_outputs)
        {
            var g = grad_outputs[0].clone();
            return [null, g, g];
        }
    }

    /// <summary>y = w (a parameter) passed through; backward hands back the incoming gradient itself.</summary>
    private sealed class Identity : CustomFunction
    {
        protected override string name => "identity";

        protected override Tensor[] forward(Tensor?[] inputs) => [inputs[0]!.clone()];

        protected override Tensor?[] backward(Tensor[] grad_outputs) => [grad_outputs[0]];
    }

    private static (Tensor x, Tensor w) Inputs() =>
        (tensor(new[] { 1.0, -2.0, 3.0 }, device: Dev), tensor(new[] { 0.5, 4.0, -1.5 }, device: Dev, requires_grad: true));

    [Fact]
    public void Inside_the_scope_a_parameter_takes_its_gradient_without_a_copy_and_accumulates_as_autograd_does()
    {
        using var scope = NewDisposeScope();
        var (x, w) = Inputs();
        var writes = CustomFunction.LeafGradientWrites;
        var f = new Weighted();
        using (CustomFunction.AccumulateLeafGradients()) f.apply(x, w)[0].sum().backward();
        Assert.Equal(x.data<double>().ToArray(), w.grad!.data<double>().ToArray());
        Assert.Equal(f.WeightGradient, torchx.data_ptr(w.grad!));
        Assert.Equal(writes + 1, CustomFunction.LeafGradientWrites);
        // A second backward adds to it in place, as AccumulateGrad does.
        var first = torchx.data_ptr(w.grad!);
        using (CustomFunction.AccumulateLeafGradients()) new Weighted().apply(x, w)[0].mul(3).sum().backward();
        Assert.Equal(x.data<double>().Select(v => 4 * v).ToArray(), w.grad!.data<double>().ToArray());
        Assert.Equal(first, torchx.data_ptr(w.grad!));
    }

    [Fact]
    public void Outside_the_scope_libtorch_accumulates_and_autograd_grad_still_sees_the_parameter()
    {
        using var scope = NewDisposeScope();
        var (x, w) = Inputs();
        var writes = CustomFunction.LeafGradientWrites;
        var f = new Weighted();
        f.apply(x, w)[0].sum().backward();
        Assert.Equal(x.data<double>().ToArray(), w.grad!.data<double>().ToArray());
        Assert.NotEqual(f.WeightGradient, torchx.data_ptr(w.grad!)); // AccumulateGrad's copy
        var g = torch.autograd.grad([new Weighted().apply(x, w)[0].sum()], [w]);
        Assert.Equal(x.data<double>().ToArray(), g[0].data<double>().ToArray());
        Assert.Equal(writes, CustomFunction.LeafGradientWrites);
    }

    [Fact]
    public void One_tensor_returned_for_two_parameters_is_left_to_libtorch_so_the_gradients_stay_apart()
    {
        using var scope = NewDisposeScope();
        var x = tensor(new[] { 1.0, 2.0 }, device: Dev);
        var w1 = zeros(2, ScalarType.Float64, Dev).requires_grad_();
        var w2 = zeros(2, ScalarType.Float64, Dev).requires_grad_();
        var writes = CustomFunction.LeafGradientWrites;
        using (CustomFunction.AccumulateLeafGradients()) new SharedGradient().apply(x, w1, w2)[0].sum().backward();
        Assert.Equal(writes, CustomFunction.LeafGradientWrites);
        Assert.NotEqual(torchx.data_ptr(w1.grad!), torchx.data_ptr(w2.grad!));
        using (no_grad()) w1.grad!.add_(1);
        Assert.Equal(new[] { 1.0, 1.0 }, w2.grad!.data<double>().ToArray());
    }

    [Fact]
    public void The_incoming_gradient_handed_back_is_left_to_libtorch()
    {
        using var scope = NewDisposeScope();
        var (_, w) = Inputs();
        var writes = CustomFunction.LeafGradientWrites;
        var upstream = tensor(new[] { 1.0, 2.0, 3.0 }, device: Dev);
        using (CustomFunction.AccumulateLeafGradients()) new Identity().apply(w)[0].backward([upstream]);
        Assert.Equal(writes, CustomFunction.LeafGradientWrites);
        Assert.Equal(upstream.data<double>().ToArray(), w.grad!.data<double>().ToArray());
    }

    [Fact]
    public void A_non_leaf_input_gets_its_gradient_through_libtorch_and_switched_off_nothing_is_written()
    {
        using var scope = NewDisposeScope();
        var (x, w) = Inputs();
        var writes = CustomFunction.LeafGradientWrites;
        using (CustomFunction.AccumulateLeafGradients()) new Weighted().apply(x, w * 2)[0].sum().backward();
        Assert.Equal(x.data<double>().Select(v => 2 * v).ToArray(), w.grad!.data<double>().ToArray());
        Assert.Equal(writes, CustomFunction.LeafGradientWrites);
        var was = CustomFunction.LeafGradients;
        CustomFunction.LeafGradients = false;
        try
        {
            w.grad = null;
            using (CustomFunction.AccumulateLeafGradients()) new Weighted().apply(x, w)[0].sum().backward();
            Assert.Equal(writes, CustomFunction.LeafGradientWrites);
            Assert.Equal(x.data<double>().ToArray(), w.grad!.data<double>().ToArray());
        }
        finally
        {
            CustomFunction.LeafGradients = was;
        }
    }
}
