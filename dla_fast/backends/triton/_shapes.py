"""The convolution and root shapes of timm's DLA family at 224x224 input, for checks and benchmarks.

Read off timm's models (dla34 ... dla169, dla60x, dla102x2, dla60_res2net/res2next, dla46_c/46x_c) with
forward hooks; ``h`` is the input height (= width), the output is ``(h + 2p - k) // stride + 1``. The
Bottle2neck's final 1x1 over its 4 splits is listed as an aggregate (children = the splits, with a
residual tensor), which is how dla_fast runs it.
"""

CONV_SHAPES = [
    # name, cin, cout, h, k, stride, pad, groups
    ("stem 7x7 (all)", 3, 16, 224, 7, 1, 3, 1),
    ("level0 3x3 (all)", 16, 16, 224, 3, 1, 1, 1),
    ("level1 3x3 s2 (all)", 16, 32, 224, 3, 2, 1, 1),
    ("dla34 l2 3x3 s2", 32, 64, 112, 3, 2, 1, 1),
    ("dla34 l2 3x3", 64, 64, 56, 3, 1, 1, 1),
    ("dla34 l2 proj 1x1", 32, 64, 56, 1, 1, 0, 1),
    ("dla34 l3 3x3 s2", 64, 128, 56, 3, 2, 1, 1),
    ("dla34 l3 3x3", 128, 128, 28, 3, 1, 1, 1),
    ("dla34 l3 proj 1x1", 64, 128, 28, 1, 1, 0, 1),
    ("dla34 l4 3x3 s2", 128, 256, 28, 3, 2, 1, 1),
    ("dla34 l4 3x3", 256, 256, 14, 3, 1, 1, 1),
    ("dla34 l5 3x3 s2", 256, 512, 14, 3, 2, 1, 1),
    ("dla34 l5 3x3", 512, 512, 7, 3, 1, 1, 1),
    ("dla34 head 1x1", 512, 1000, 1, 1, 1, 0, 1),
    ("dla60 l2 conv1 1x1", 32, 64, 112, 1, 1, 0, 1),
    ("dla60 l2 conv2 3x3 s2", 64, 64, 112, 3, 2, 1, 1),
    ("dla60 l2 conv3 1x1", 64, 128, 56, 1, 1, 0, 1),
    ("dla60 l2 conv1b 1x1", 128, 64, 56, 1, 1, 0, 1),
    ("dla60 l2 conv2b 3x3", 64, 64, 56, 3, 1, 1, 1),
    ("dla60 l3 conv1 1x1", 128, 128, 56, 1, 1, 0, 1),
    ("dla60 l4 conv3 1x1", 256, 512, 14, 1, 1, 0, 1),
    ("dla60 l5 conv2 3x3", 512, 512, 7, 3, 1, 1, 1),
    ("dla60 l5 conv3 1x1", 512, 1024, 7, 1, 1, 0, 1),
    ("dla60x l2 g32 3x3 s2 (4/grp)", 128, 128, 112, 3, 2, 1, 32),
    ("dla60x l2 g32 3x3 (4/grp)", 128, 128, 56, 3, 1, 1, 32),
    ("dla60x l3 g32 3x3 (8/grp)", 256, 256, 28, 3, 1, 1, 32),
    ("dla60x l4 g32 3x3 (16/grp)", 512, 512, 14, 3, 1, 1, 32),
    ("dla60x l5 g32 3x3 (32/grp)", 1024, 1024, 7, 3, 1, 1, 32),
    ("dla46x_c g32 3x3 (2/grp)", 64, 64, 56, 3, 1, 1, 32),
    ("dla102x2 g64 3x3 (4/grp)", 256, 256, 56, 3, 1, 1, 64),
    ("dla102x2 g64 3x3 (32/grp)", 2048, 2048, 7, 3, 1, 1, 64),
    ("res2next g8 3x3 s2 (4/grp)", 32, 32, 112, 3, 2, 1, 8),
    ("res2next g8 3x3 (4/grp)", 32, 32, 56, 3, 1, 1, 8),
    ("res2next g8 3x3 (32/grp)", 256, 256, 7, 3, 1, 1, 8),
    ("res2net 3x3 (28 ch)", 28, 28, 56, 3, 1, 1, 1),
    ("res2net 3x3 (224 ch)", 224, 224, 7, 3, 1, 1, 1),
]

AGG_SHAPES = [
    # name, children, cout, h, shortcut (residual = children[0]); "res" = a separate residual tensor
    ("dla34 root l2", (64, 64), 64, 56, False),
    ("dla34 root l3", (128, 128, 64, 128), 128, 28, False),
    ("dla34 root l4", (256, 256, 128, 256), 256, 14, False),
    ("dla34 root l5", (512, 512, 256), 512, 7, False),
    ("dla60 root l2", (128, 128), 128, 56, False),
    ("dla60 root l3", (256, 256, 128, 256), 256, 28, False),
    ("dla60 root l4", (512, 512, 256, 512, 512), 512, 14, False),
    ("dla60 root l5", (1024, 1024, 512), 1024, 7, False),
    ("dla102 root l4 (shortcut)", (512, 512, 256, 512, 512, 512), 512, 14, True),
    ("dla169 root l4 (7 children)", (512, 512, 256, 512, 512, 512, 512), 512, 14, True),
    ("res2net conv3 l2 (4 splits)", (28, 28, 28, 28), 128, 56, "res"),
    ("res2next conv3 l5 (4 splits)", (256, 256, 256, 256), 1024, 7, "res"),
]

CONV_SHAPES = [dict(name=n, cin=a, cout=b, h=h, k=k, stride=s, pad=p, groups=g)
               for (n, a, b, h, k, s, p, g) in CONV_SHAPES]
AGG_SHAPES = [dict(name=n, children=tuple(c), cout=o, h=h, shortcut=sc) for (n, c, o, h, sc) in AGG_SHAPES]
