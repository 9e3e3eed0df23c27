using TorchSharp.Modules;

namespace LoRAHub.TorchExtensions.Tests;

/// <summary>Module surgery on plain TorchSharp modules: get_submodule, replace_submodule, requires_grad_, ILinearLayer.</summary>
public class ModuleTests
{
    /// <summary>A plain TorchSharp block: swappable children are fields typed Module&lt;Tensor, Tensor&gt;.</summary>
    private sealed class Block : nn.Module<Tensor, Tensor>
    {
        private nn.Module<Tensor, Tensor> proj;
        private readonly nn.Module<Tensor, Tensor> act = nn.Tanh();
        [TorchSharp.Utils.ComponentName(Name = "out")] private nn.Module<Tensor, Tensor> output;
        public Linear fixedType = nn.Linear(2, 2);
        private readonly Tensor scale = ones(2);
        private readonly nn.IModule<Tensor, Tensor> gate = nn.Identity(); // an interface-typed field

        public Block() : base("Block")
        {
            proj = nn.Linear(3, 2);
            output = nn.Linear(2, 2, hasBias: false);
            RegisterComponents();
        }

        public override Tensor forward(Tensor x) => gate.call(output.forward(act.forward(proj.forward(x))));
    }

    private sealed class Outer : nn.Module<Tensor, Tensor>
    {
        private readonly Block block = new();
        public readonly ModuleList<nn.Module<Tensor, Tensor>> layers = nn.ModuleList<nn.Module<Tensor, Tensor>>(nn.Linear(2, 2), nn.Linear(2, 2));
        public readonly Sequential head = nn.Sequential(nn.Linear(2, 2), nn.ReLU());
        public readonly ModuleDict<nn.Module<Tensor, Tensor>> extra = nn.ModuleDict<nn.Module<Tensor, Tensor>>(("a", nn.Linear(2, 2)), ("b", nn.Identity()));

        public Outer() : base("Outer") => RegisterComponents();

        public override Tensor forward(Tensor x)
        {
            x = block.forward(x);
            foreach (var layer in layers) x = layer.forward(x);
            return head.forward(x);
        }
    }

    /// <summary>y = base(x) + 1: a stand-in for an adapter layer wrapping the module it replaces.</summary>
    private sealed class PlusOne : nn.Module<Tensor, Tensor>
    {
        private readonly nn.Module<Tensor, Tensor> inner;
        public PlusOne(nn.Module<Tensor, Tensor> inner) : base("PlusOne")
        {
            this.inner = inner;
            RegisterComponents();
        }

        /// <summary>Forward passes through this wrapper (whether the model really calls it where it was put).</summary>
        public int Calls { get; private set; }

        public override Tensor forward(Tensor x)
        {
            Calls++;
            return inner.forward(x) + 1;
        }
    }

    [Fact]
    public void Get_submodule_walks_dotted_paths()
    {
        using var m = new Outer();
        Assert.Same(m, m.get_submodule(""));
        Assert.IsType<Linear>(m.get_submodule("block.proj"));
        Assert.IsType<Linear>(m.get_submodule("block.out"));
        Assert.IsType<Linear>(m.get_submodule("layers.1"));
        Assert.IsType<ReLU>(m.get_submodule("head.1"));
        Assert.Null(m.get_submodule("block.nope"));
        Assert.Null(m.get_submodule("layers.5"));
        Assert.Equal("Outer", m.TypeName());
        Assert.Equal("ModuleList", m.get_submodule("layers")!.TypeName());
    }

    [Fact]
    public void Replacing_a_field_child_changes_forward_parameters_and_keeps_their_order()
    {
        using var scope = NewDisposeScope();
        using var m = new Block();
        var names = m.named_parameters().Select(p => p.name).ToList();
        Assert.Equal(new[] { "proj.weight", "proj.bias", "out.weight", "fixedType.weight", "fixedType.bias" }, names);
        var x = randn(4, 3);
        var before = m.forward(x);
        var old = (nn.Module<Tensor, Tensor>)m.get_submodule("proj")!;
        var returned = m.replace_submodule("proj", new PlusOne(old));
        Assert.Same(old, returned);
        Assert.IsType<PlusOne>(m.get_submodule("proj"));
        // forward reads the field: the replacement is used.
        using (no_grad())
        {
            var expected = ((nn.Module<Tensor, Tensor>)m.get_submodule("out")!).forward((old.forward(x) + 1).tanh());
            Assert.True(m.forward(x).allclose(expected));
            Assert.False(m.forward(x).allclose(before));
        }
        // registered in place: same position, the wrapped module's parameters under the new path.
        Assert.Equal(new[] { "proj.inner.weight", "proj.inner.bias", "out.weight", "fixedType.weight", "fixedType.bias" }, m.named_parameters().Select(p => p.name));
        Assert.Equal(new[] { "proj", "act", "out", "fixedType", "gate" }, m.named_children().Select(c => c.name));
        Assert.Contains("proj.inner.weight", m.state_dict().Keys);
        using (no_grad())
        {
            var y = m.forward(x);
            m.replace_submodule("gate", new PlusOne(nn.Identity()));
            Assert.True(m.forward(x).allclose(y + 1));
        }
    }

    [Fact]
    public void Component_names_module_lists_dicts_and_sequentials_are_replaced_in_place()
    {
        using var scope = NewDisposeScope();
        using var m = new Outer();
        var x = randn(2, 3);
        var wrappers = new[]
        {
            new PlusOne((nn.Module<Tensor, Tensor>)m.get_submodule("block.out")!), new PlusOne(m.layers[1]),
            new PlusOne((nn.Module<Tensor, Tensor>)m.get_submodule("head.0")!),
        };
        m.replace_submodule("block.out", wrappers[0]);
        m.replace_submodule("layers.1", wrappers[1]);
        Assert.IsType<PlusOne>(m.layers[1]);
        m.replace_submodule("head.0", wrappers[2]);
        Assert.IsType<PlusOne>(m.get_submodule("head.0"));
        Assert.Contains("head.0.inner.weight", m.named_parameters().Select(p => p.name));
        Assert.Contains("layers.1.inner.weight", m.named_parameters().Select(p => p.name));
        Assert.Contains("block.out.inner.weight", m.named_parameters().Select(p => p.name));
        // Forward goes through every wrapper. (Comparing outputs could not tell: the head ends in a ReLU, and with
        // unseeded weights both outputs are sometimes all zeros.)
        using (no_grad()) m.forward(x);
        Assert.All(wrappers, w => Assert.Equal(1, w.Calls));

        m.replace_submodule("extra.a", new PlusOne(m.extra["a"]));
        Assert.IsType<PlusOne>(m.extra["a"]);
        Assert.Equal(new[] { "a", "b" }, m.extra.named_children().Select(c => c.name));
    }

    [Fact]
    public void A_field_that_cannot_hold_the_replacement_gives_a_clear_error()
    {
        using var m = new Block();
        var old = m.get_submodule("fixedType")!;
        var e = Assert.Throws<InvalidOperationException>(() => m.replace_submodule("fixedType", new PlusOne(nn.Identity())));
        Assert.Contains("fixedType", e.Message);
        Assert.Contains("Linear", e.Message);
        Assert.Contains("Module<Tensor, Tensor>", e.Message);
        Assert.Same(old, m.get_submodule("fixedType")); // nothing changed
        Assert.Throws<KeyNotFoundException>(() => m.replace_submodule("missing", nn.Identity()));
        Assert.Throws<KeyNotFoundException>(() => m.replace_submodule("nope.proj", nn.Identity()));
    }

    [Fact]
    public void Requires_grad_and_linear_views()
    {
        using var scope = NewDisposeScope();
        using var m = new Block();
        m.requires_grad_(false);
        Assert.All(m.parameters(), p => Assert.False(p.requires_grad));
        m.requires_grad_(true);
        Assert.All(m.parameters(), p => Assert.True(p.requires_grad));

        var linear = LinearLayer.From(m.get_submodule("proj"))!;
        Assert.Equal(3, linear.in_features);
        Assert.Equal(2, linear.out_features);
        Assert.NotNull(linear.bias);
        Assert.Equal(ScalarType.Float32, linear.weight_dtype);
        Assert.Equal(DeviceType.CPU, linear.weight_device.type);
        var w = linear.dense_weight().detach().clone();
        linear.add_to_weight_(ones(2, 3, ScalarType.Float64));
        Assert.True(linear.dense_weight().allclose(w + 1));
        Assert.Null(LinearLayer.From(m.get_submodule("act")));
        Assert.Null(LinearLayer.From(null));
    }
}
