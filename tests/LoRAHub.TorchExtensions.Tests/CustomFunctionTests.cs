using System.Runtime.InteropServices;

namespace LoRAHub.TorchExtensions.Tests;

// Alone: a failed backward leaves its exception for the next TorchErrors.Translate in the process, which a test running
// in parallel could take.
[CollectionDefinition(nameof(CustomFunctionTests), DisableParallelization = true)]
public sealed class CustomFunctionTestsCollection;

/// <summary>
/// The autograd plumbing every fused kernel rides on (<see cref="CustomFunction"/>), exercised with ops that run
/// anywhere: gradients reach the right inputs, missing output gradients become zeros, saved tensors are freed after
/// backward or when the graph dies, and an exception in backward fails backward() with a typed error instead of
/// crossing into libtorch.
/// </summary>
[Collection(nameof(CustomFunctionTests))]
public class CustomFunctionTests
{
    private static readonly Device Dev = TestDevice.Current;

    /// <summary>y1 = k·x (+ b), y2 = x²; backward by hand. Optionally throws in backward.</summary>
    private sealed class ScaleAndSquare(double k, bool fail = false, Exception? failure = null) : CustomFunction
    {
        private Tensor? x;
        public Tensor? Saved => x;
        public bool Released { get; private set; }
        public bool[] NeedsGrad { get; private set; } = [];

        protected override string name => "scale_and_square";

        protected override Tensor[] forward(Tensor?[] inputs)
        {
            x = save(inputs[0]!);
            var y1 = inputs[0]! * k;
            if (inputs[1] is { } b) y1 = y1 + b;
            return [y1, inputs[0]!.square()];
        }

        protected override Tensor?[] backward(Tensor[] grad_outputs)
        {
            NeedsGrad = [needs_input_grad(0), needs_input_grad(1)];
            if (fail) throw failure ?? new InvalidOperationException("deliberate failure in backward");
            var gx = grad_outputs[0] * k + grad_outputs[1] * 2 * x!;
            return [gx, grad_outputs[0].sum().reshape(1)];
        }

        protected override void release() => Released = true;
    }

    [Fact]
    public void Gradients_reach_the_inputs_that_need_them()
    {
        using var scope = NewDisposeScope();
        var x = tensor(new[] { 1.0, -2.0, 3.0 }, device: Dev, requires_grad: true);
        var b = tensor(new[] { 0.5 }, device: Dev, requires_grad: true);
        var f = new ScaleAndSquare(3);
        var outs = f.apply(x, b);
        Assert.True(outs[0].requires_grad);
        Assert.Equal(new[] { 3.5, -5.5, 9.5 }, outs[0].data<double>().ToArray());
        (outs[0].sum() + outs[1].sum()).backward();
        Assert.Equal(new[] { 3 + 2.0, 3 - 4.0, 3 + 6.0 }, x.grad!.data<double>().ToArray());
        Assert.Equal(3.0, b.grad!.item<double>());
        Assert.Equal([true, true], f.NeedsGrad);
        Assert.True(f.Released);
        Assert.True(f.Saved!.IsInvalid, "the saved tensor must be freed after backward");
    }

    [Fact]
    public void An_unused_output_gets_a_zero_gradient_and_absent_inputs_take_none()
    {
        using var scope = NewDisposeScope();
        var x = tensor(new[] { 1.0, 2.0 }, device: Dev, requires_grad: true);
        var f = new ScaleAndSquare(5);
        var outs = f.apply(x, null);
        outs[0].sum().backward(); // y2 = x² feeds nothing
        Assert.Equal(new[] { 5.0, 5.0 }, x.grad!.data<double>().ToArray());
        Assert.Equal([true, false], f.NeedsGrad);
    }

    [Fact]
    public void Inputs_that_need_no_gradient_make_no_graph()
    {
        using var scope = NewDisposeScope();
        var x = tensor(new[] { 1.0, 2.0 }, device: Dev);
        var f = new ScaleAndSquare(2);
        var outs = f.apply(x, null);
        Assert.False(outs[0].requires_grad);
        Assert.True(f.Released); // nothing kept for a backward that cannot come
        var g = new ScaleAndSquare(2);
        using (no_grad()) outs = g.apply(x.requires_grad_(), null);
        Assert.False(outs[0].requires_grad);
        Assert.True(g.Released);
    }

    [Fact]
    public void Dropping_the_graph_without_backward_frees_what_forward_saved()
    {
        var x = tensor(new[] { 1.0, 2.0 }, device: Dev, requires_grad: true);
        var f = new ScaleAndSquare(2);
        var outs = f.apply(x, null);
        Assert.False(f.Released);
        foreach (var o in outs) o.Dispose(); // the last references to the node
        Assert.True(f.Released);
        Assert.True(f.Saved!.IsInvalid);
        x.Dispose();
    }

    [Fact]
    public void An_exception_in_backward_fails_backward_with_a_typed_error()
    {
        using var scope = NewDisposeScope();
        var x = tensor(new[] { 1.0, 2.0 }, device: Dev, requires_grad: true);
        var outs = new ScaleAndSquare(2, fail: true).apply(x, null);
        var e = Assert.ThrowsAny<ExternalException>(() => outs[0].sum().backward());
        var typed = TorchErrors.Translate(e);
        Assert.IsAssignableFrom<TorchException>(typed);
        Assert.Contains("deliberate failure in backward", typed.Message);
        Assert.IsType<InvalidOperationException>(typed.InnerException);
        Assert.Contains("scale_and_square", typed.InnerException!.Message);
        // The process and autograd still work.
        var y = new ScaleAndSquare(2).apply(x, null);
        x.grad = null;
        y[0].sum().backward();
        Assert.Equal(new[] { 2.0, 2.0 }, x.grad!.data<double>().ToArray());
    }

    [Fact]
    public void Out_of_memory_in_backward_is_typed_as_such_and_translating_twice_keeps_the_cause()
    {
        using var scope = NewDisposeScope();
        var x = tensor(new[] { 1.0, 2.0 }, device: Dev, requires_grad: true);
        var oom = new ExternalException("CUDA out of memory. Tried to allocate 2.00 GiB");
        var outs = new ScaleAndSquare(2, fail: true, failure: oom).apply(x, null);
        var e = Assert.ThrowsAny<ExternalException>(() => outs[0].sum().backward());
        // An exception filter classifies, then the catch translates again: both must see the kept cause.
        var first = TorchErrors.Translate(e);
        var second = TorchErrors.Translate(e);
        Assert.Same(first, second);
        var typed = Assert.IsType<OutOfMemoryTorchException>(first);
        Assert.Contains("Tried to allocate 2.00 GiB", typed.Message);
        Assert.Contains("lower the batch size", typed.Message);
    }

    [Fact]
    public void A_second_backward_through_the_same_node_is_a_clear_error()
    {
        using var scope = NewDisposeScope();
        var x = tensor(new[] { 1.0 }, device: Dev, requires_grad: true);
        var outs = new ScaleAndSquare(2).apply(x, null);
        var loss = outs[0].sum();
        loss.backward(retain_graph: true);
        var e = TorchErrors.Translate(Assert.ThrowsAny<ExternalException>(() => loss.backward()));
        Assert.Contains("backward ran twice", e.Message);
    }
}
