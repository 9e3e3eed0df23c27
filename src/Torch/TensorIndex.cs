namespace LoRAHub.Torch;

/// <summary>One entry of a Python-style index: an integer, a slice, ..., None (new axis) or a tensor.</summary>
public readonly struct TensorIndex
{
    private enum Kind { Single, Slice, Ellipsis, NewAxis, Tensor }

    private readonly Kind kind;
    private readonly long single;
    private readonly long? start, stop;
    private readonly long step;
    private readonly bool startFromEnd, stopFromEnd;
    private readonly Tensor? tensor;

    private TensorIndex(Kind kind, long single = 0, long? start = null, long? stop = null, long step = 1,
        bool startFromEnd = false, bool stopFromEnd = false, Tensor? tensor = null)
    {
        this.kind = kind;
        this.single = single;
        this.start = start;
        this.stop = stop;
        this.step = step;
        this.startFromEnd = startFromEnd;
        this.stopFromEnd = stopFromEnd;
        this.tensor = tensor;
    }

    public static readonly TensorIndex Ellipsis = new(Kind.Ellipsis);
    public static readonly TensorIndex None = new(Kind.NewAxis);
    public static readonly TensorIndex Colon = new(Kind.Slice);

    /// <summary>start:stop:step; negative values count from the end, as in Python.</summary>
    public static TensorIndex Slice(long? start = null, long? stop = null, long step = 1)
    {
        if (step <= 0) throw new ArgumentOutOfRangeException(nameof(step), "slice step must be positive");
        return new(Kind.Slice, start: start, stop: stop, step: step);
    }

    public static TensorIndex Single(long index) => new(Kind.Single, single: index);

    public static implicit operator TensorIndex(long index) => Single(index);
    public static implicit operator TensorIndex(int index) => Single(index);
    public static implicit operator TensorIndex(Tensor t) => new(Kind.Tensor, tensor: t);

    public static implicit operator TensorIndex(Index index) =>
        index.IsFromEnd ? Single(-index.Value) : Single(index.Value);

    public static implicit operator TensorIndex(Range range) => new(Kind.Slice,
        start: range.Start.Value, stop: range.End.IsFromEnd && range.End.Value == 0 ? null : range.End.Value, step: 1,
        startFromEnd: range.Start.IsFromEnd, stopFromEnd: range.End.IsFromEnd);

    internal static Tensor Apply(Tensor source, TensorIndex[] indices)
    {
        var consumed = indices.Count(i => i.kind is Kind.Single or Kind.Slice or Kind.Tensor);
        var ellipsisCount = indices.Count(i => i.kind == Kind.Ellipsis);
        if (ellipsisCount > 1) throw new ArgumentException("an index can have only one ellipsis (...)");
        var rank = source.dim();
        if (consumed > rank)
            throw new IndexOutOfRangeException($"too many indices ({consumed}) for a tensor of {rank} dimensions {source.ShapeString}");

        // Intermediate views are owned here and freed; only the result survives.
        var current = source;
        var owned = new List<Tensor>();
        long dim = 0;
        try
        {
            foreach (var index in indices)
            {
                Tensor next;
                switch (index.kind)
                {
                    case Kind.Ellipsis:
                        dim += rank - consumed;
                        continue;
                    case Kind.NewAxis:
                        next = current.unsqueeze(dim);
                        dim++;
                        break;
                    case Kind.Single:
                        next = current.select(dim, index.single);
                        break;
                    case Kind.Tensor:
                        if (dim != 0) throw new NotSupportedException("tensor indices are supported only on the first dimension; use index_select or gather");
                        next = current.index(index.tensor!);
                        dim++;
                        break;
                    default:
                        var size = current.size((int)dim);
                        long Resolve(long? v, bool fromEnd, long fallback) =>
                            v is null ? fallback : fromEnd ? size - v.Value : v.Value < 0 ? size + v.Value : v.Value;
                        var s = Math.Clamp(Resolve(index.start, index.startFromEnd, 0), 0, size);
                        var e = Math.Clamp(Resolve(index.stop, index.stopFromEnd, size), 0, size);
                        next = current.slice(dim, s, Math.Max(s, e), index.step);
                        dim++;
                        break;
                }
                if (!ReferenceEquals(current, source)) owned.Add(current);
                current = next;
            }
            if (ReferenceEquals(current, source)) current = source.alias();
            return current;
        }
        finally
        {
            foreach (var t in owned) t.Dispose();
        }
    }
}
