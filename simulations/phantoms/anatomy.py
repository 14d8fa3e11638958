"""A random upper-abdomen anatomy defined in a continuous millimetre frame.

`sample_anatomy` draws one patient (body habitus, liver shape and size, fibrosis stage effects,
vessel trees, neighbouring organs); `Anatomy.evaluate` returns the tissue class at any set of points,
so every phase can sample it on its own grid after its own motion. Frame: LPS millimetres (+x patient
left, +y posterior, +z superior), x = 0 on the midline, z = 0 near the middle of the liver.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from simulations.phantoms.contrast import Tissue
from simulations.phantoms.shapes import (
    Box, Deformation, Points, Segments, Slabs, SmoothField, box_around, capsule, cylinder_z, ellipsoid,
    rotation_matrix, smooth_union, trunk_section, take, tapered_ellipsoid,
)

#: Stage-dependent liver changes: surface nodularity amplitude (mm), caudate and right-lobe scale.
NODULARITY_MM = {1: 0.3, 2: 1.2, 3: 2.4, 4: 3.6}
CAUDATE_SCALE = {1: 1.0, 2: 1.08, 3: 1.2, 4: 1.32}
RIGHT_LOBE_SCALE = {1: 1.0, 2: 0.98, 3: 0.94, 4: 0.89}


@dataclass
class Sample:
    """Tissue at each evaluated point."""

    labels: np.ndarray   # uint8 Tissue per point
    liver: np.ndarray    # bool, the ground-truth liver (parenchyma + intrahepatic vessels)
    tumor: np.ndarray    # bool, tumours (subset of `liver`)
    hetero: np.ndarray   # float32, zero-mean parenchymal heterogeneity (0 outside the liver)
    septa: np.ndarray    # float32 in [0, 1], fibrous septa (0 outside the liver)
    mottle: np.ndarray   # float32, zero-mean slow variation of every tissue (no organ is flat)


@dataclass
class Anatomy:
    stage: int
    # body (trunk) cross-section
    half_x: float
    ant: float
    post: float
    fat: float
    wall: float
    # diaphragm domes (z of the right and left dome tops)
    dome_r: float
    dome_l: float
    # liver frame: points are deformed, then scaled about `liver_center`
    liver_center: np.ndarray
    liver_scale: np.ndarray
    liver_deform: Deformation
    nodules: SmoothField
    hetero_field: SmoothField
    septa_field: SmoothField
    mottle_field: SmoothField
    right_lobe: tuple
    left_lobe: tuple
    caudate: tuple
    inferior_plane: tuple[float, float, float]  # z0, dz/dx, dz/dy
    gallbladder: tuple
    portal: Segments        # intrahepatic (liver frame)
    portal_trunk: Segments  # extrahepatic (organ frame)
    hepatic: Segments
    # other organs
    spleen: tuple
    spleen_hilum: tuple
    kidneys: list[tuple]
    stomach: Segments
    gas_level: float
    pancreas: Segments
    bowel: Segments
    bowel_fluid: Segments
    mesenteric: Segments
    rib_phase: float
    colon_gas: Segments
    ivc: Segments
    aorta: Segments
    tumors: list[tuple[np.ndarray, float]] = field(default_factory=list)

    # ---------------------------------------------------------------- geometry helpers
    def diaphragm(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        right = self.dome_r - ((x + 55.0) ** 2 + 0.6 * (y + 5.0) ** 2) * (1 / 220.0)
        left = self.dome_l - ((x - 60.0) ** 2 + 0.6 * (y + 5.0) ** 2) * (1 / 220.0)
        return np.maximum(right, left)

    def _section(self, p: Points, fat: float, wall: float) -> np.ndarray:
        # subcutaneous fat is thicker in front, the lateral wall muscles thicker than the rectus
        return trunk_section(p, (0.0, 0.0), self.half_x - fat - 1.3 * wall,
                             self.ant - 1.3 * fat - 0.8 * wall, self.post - 0.8 * fat - wall)

    def cavity(self, p: Points) -> np.ndarray:
        return self._section(p, self.fat, self.wall)

    def liver_frame(self, p: Points) -> Points:
        q = self.liver_deform(p)
        c = self.liver_center.astype(np.float32)
        inv = (1.0 / self.liver_scale).astype(np.float32)
        return tuple((q[a] - c[a]) * inv[a] + c[a] for a in range(3))  # type: ignore[return-value]

    def liver_sdf(self, p: Points, q: Points, cavity: np.ndarray) -> np.ndarray:
        """Signed distance (mm) of the liver, `p` in the organ frame, `q` in the liver frame."""
        right = ellipsoid(q, *self.right_lobe)
        left = tapered_ellipsoid(q, *self.left_lobe)
        caud = ellipsoid(q, *self.caudate)
        s = smooth_union(smooth_union(right, left, 18.0), caud, 10.0)
        z0, gx, gy = (np.float32(v) for v in self.inferior_plane)
        s = np.maximum(s, (z0 + gx * q[0] + gy * q[1]) - q[2])      # inferior surface: lowest at the lateral tip
        s = s + self.nodules(q)                                      # surface nodularity (stage)
        s = np.maximum(s, cavity + 2.0)                              # stays inside the abdominal wall
        s = np.maximum(s, p[2] - (self.diaphragm(p[0], p[1]) - 3.0))  # under the diaphragm
        kid = self.kidneys[0]
        s = np.maximum(s, -(ellipsoid(p, kid[0], np.asarray(kid[1]) + 5.0, kid[2])))  # kidney fossa
        s = np.maximum(s, -cylinder_z(p, 0.0, 22.0, 32.0, 28.0))     # away from the spine
        return s

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, p: Points, breathing: float = 0.0, run: int | None = None) -> Sample:
        """Tissue classes at points `p` (patient frame, mm).

        `breathing` shifts the organs (not the body wall and spine) along z, as the diaphragm does.
        `run`: points come in slices of `run` points (grid order), which speeds up the search.
        """
        n = p[0].shape[0]
        lab = np.zeros(n, np.uint8)
        o = (p[0], p[1], (p[2] - np.float32(breathing)).astype(np.float32))  # organ frame
        ok = run is not None and run > 0 and n % run == 0
        so = Slabs(o[2], run) if ok else None
        sp = Slabs(p[2], run) if ok else None

        body = trunk_section(p, (0.0, 0.0), self.half_x, self.ant, self.post)
        lab[body < 0] = Tissue.SUBQ_FAT
        wall = self._section(p, self.fat, 0.0)
        lab[wall < 0] = Tissue.MUSCLE
        cav = self.cavity(p)
        in_cav = cav < 0
        # ribs: sloping bands (posterior ends higher) crossing the muscle wall, none in front below the sternum
        shell = np.flatnonzero((wall < 0) & (cav > -3.0))
        sx, sy, sz = take(p, shell)
        level = sz - np.float32(0.4) * sy
        rib = (np.mod(level - np.float32(self.rib_phase), np.float32(30.0)) < 9.0) & (level > -110) & (level < 160)
        rib &= (sy > -30.0) | (np.abs(sx) > 60.0)
        lab[shell[rib]] = Tissue.BONE
        lab[in_cav] = Tissue.VISCERAL_FAT
        lab[in_cav & (o[2] > self.diaphragm(o[0], o[1]))] = Tissue.LUNG

        def paint(box: Box, fn, tissue: int, src: Points = o) -> np.ndarray:
            idx = box.select(src, so if src is o else sp)
            if idx.size:
                idx = idx[fn(take(src, idx)) < 0]
                lab[idx] = tissue
            return idx

        # heart sits on the diaphragm
        hc = (20.0, -40.0, self.dome_l + 55.0)
        paint(box_around(hc, (80, 65, 65)),
              lambda q: np.maximum(ellipsoid(q, hc, (80, 60, 60)), self.diaphragm(q[0], q[1]) + 4.0 - q[2]),
              Tissue.HEART)

        # bowel and colon below the liver, kidneys, back muscles, spine
        lab[self.bowel.inside(o, so) & in_cav] = Tissue.BOWEL
        lab[self.bowel_fluid.inside(o, so) & in_cav] = Tissue.STOMACH  # fluid-filled loops
        lab[self.colon_gas.inside(o, so) & in_cav] = Tissue.GAS
        for center, radii, rot in self.kidneys:
            paint(box_around(center, max(radii)), lambda q: ellipsoid(q, center, radii, rot), Tissue.KIDNEY_CORTEX)
            med = np.asarray(center) + np.array([-np.sign(center[0]) * 6.0, -4.0, 0.0])  # towards the hilum
            paint(box_around(med, max(radii)), lambda q: ellipsoid(q, med, np.asarray(radii) * 0.6, rot),
                  Tissue.KIDNEY_MEDULLA)
            sinus = np.asarray(center) + np.array([-np.sign(center[0]) * 14.0, -6.0, 0.0])
            paint(box_around(sinus, max(radii)), lambda q: ellipsoid(q, sinus, np.asarray(radii) * (0.3, 0.3, 0.45), rot),
                  Tissue.VISCERAL_FAT)
        for sx in (-1.0, 1.0):
            paint(Box((sx * 36 - 34, 40, -1e4), (sx * 36 + 34, 100, 1e4)),  # erector spinae
                  lambda q: cylinder_z(q, sx * 36.0, 70.0, 31.0, 19.0), Tissue.MUSCLE, p)
            paint(Box((sx * 40 - 40, -20, -400), (sx * 40 + 40, 50, -25)),
                  lambda q: capsule(q, (sx * 28, 22, -25), (sx * 48, 10, -260), 5.0, 30.0), Tissue.MUSCLE, p)
        spine_box = Box((-30, -5, -1e4), (30, 85, 1e4))
        vb = paint(spine_box, lambda q: cylinder_z(q, 0.0, 22.0, 22.0, 18.0), Tissue.BONE, p)
        disc = vb[np.mod(p[2][vb] - self.dome_r, 34.0) < 7.0]
        lab[disc] = Tissue.DISC
        paint(spine_box, lambda q: cylinder_z(q, 0.0, 66.0, 5.0, 12.0), Tissue.BONE, p)
        paint(spine_box, lambda q: cylinder_z(q, 0.0, 50.0, 9.0, 8.0), Tissue.CSF, p)

        # pancreas, stomach (wall, content, gas), spleen
        lab[self.pancreas.inside(o, so) & in_cav] = Tissue.PANCREAS
        lab[self.mesenteric.inside(o, so) & in_cav] = Tissue.PORTAL_VEIN
        wall_seg = Segments(self.stomach.starts, self.stomach.ends,
                            [r + 3.0 for r in self.stomach.r0], [r + 3.0 for r in self.stomach.r1])
        lab[wall_seg.inside(o, so) & in_cav] = Tissue.BOWEL
        st = self.stomach.inside(o, so) & in_cav
        lab[st] = Tissue.STOMACH
        lab[st & (o[1] < self.gas_level)] = Tissue.GAS
        sc, sr, srot = self.spleen
        hc_, hr_ = self.spleen_hilum
        paint(box_around(sc, max(sr)),
              lambda q: np.maximum.reduce([ellipsoid(q, sc, sr, srot), -ellipsoid(q, hc_, hr_),
                                           q[2] - self.diaphragm(q[0], q[1]) + 3.0,
                                           self.cavity((q[0], q[1], q[2])) + 1.0]),
              Tissue.SPLEEN)

        # portal trunk, splenic and mesenteric veins; the liver then covers the trunk's end
        lab[self.portal_trunk.inside(o, so) & in_cav] = Tissue.PORTAL_VEIN

        # liver (deformed frame), gallbladder, intrahepatic vessels
        liver = np.zeros(n, bool)
        hetero = np.zeros(n, np.float32)
        septa = np.zeros(n, np.float32)
        lbox = Box((-175, -140, -150), (130, 110, 120)).select(o, so)
        if lbox.size:  # cheap superset first: the lobes, inflated by scale, deformation and nodules
            po = take(o, lbox)
            grow = float(self.liver_scale.max()) * 1.05
            pre = np.minimum(ellipsoid(po, self.right_lobe[0], self.right_lobe[1] * grow + 30.0),
                             ellipsoid(po, self.left_lobe[0], self.left_lobe[1] * grow + 30.0))
            lbox = lbox[pre < 0]
        if lbox.size:
            po = take(o, lbox)
            q = self.liver_frame(po)
            inside = self.liver_sdf(po, q, cav[lbox]) < 0
            li = lbox[inside]
            qi = take(q, np.flatnonzero(inside))
            liver[li] = True
            lab[li] = Tissue.LIVER
            hetero[li] = self.hetero_field(qi)
            septa[li] = np.exp(-(self.septa_field(qi) * np.float32(1 / 0.3)) ** 2)
            gb = ellipsoid(q, *self.gallbladder) < 0
            lab[lbox[gb]] = Tissue.GALLBLADDER
            liver[lbox[gb]] = False
            keep = liver[li]
            li, qi = li[keep], take(qi, np.flatnonzero(keep))
            lab[li[self.portal.inside(qi)]] = Tissue.PORTAL_VEIN
            lab[li[self.hepatic.inside(qi)]] = Tissue.HEPATIC_VEIN
        else:
            li, qi = lbox, (np.zeros(0, np.float32),) * 3
        ivc = self.ivc.inside(o, so)
        lab[ivc] = Tissue.IVC
        liver[ivc] = False
        aorta = self.aorta.inside(o, so)
        lab[aorta] = Tissue.AORTA
        liver[aorta] = False

        tumor = np.zeros(n, bool)
        for c, r in self.tumors:  # in the liver frame: tumours deform with the liver
            idx = li[ellipsoid(qi, c, (r, r * 0.9, r * 1.1)) < 0]
            idx = idx[liver[idx]]
            tumor[idx] = True
            lab[idx] = Tissue.TUMOR
        mottle = np.zeros(n, np.float32)
        inside_body = np.flatnonzero(lab != Tissue.AIR)
        mottle[inside_body] = self.mottle_field(take(o, inside_body))
        return Sample(lab, liver, tumor, hetero, septa, mottle)


# -------------------------------------------------------------------- sampling a patient
def _jit(rng: np.random.Generator, point, sd: float) -> np.ndarray:
    return np.asarray(point, float) + rng.normal(0.0, sd, 3)


def _vessel_tree(rng: np.random.Generator, trunks: list[tuple], n_side: int = 2) -> Segments:
    """Main branches (jittered; shared nodes stay shared) plus a few random side branches."""
    seg = Segments()
    nodes: dict[tuple, np.ndarray] = {}
    for a, b, r0, r1 in trunks:
        a = nodes.setdefault(tuple(a), _jit(rng, a, 3.0))
        b = nodes.setdefault(tuple(b), _jit(rng, b, 5.0))
        seg.add(a, b, r0, r1)
        for _ in range(n_side):
            t = rng.uniform(0.35, 0.85)
            start = a + t * (b - a)
            d = rng.normal(size=3)
            d -= d @ (b - a) / ((b - a) @ (b - a)) * (b - a) * 0.7
            d /= np.linalg.norm(d)
            r_here = r0 + t * (r1 - r0)
            seg.add(start, start + d * rng.uniform(22, 42), max(r_here * 0.65, 1.8), 1.5)
    return seg


def sample_anatomy(rng: np.random.Generator, stage: int, n_tumors: int = 0) -> Anatomy:
    """Draw one patient. `stage` (1-4) shapes the fibrotic liver; `n_tumors` adds lesions (ATLAS)."""
    u = rng.uniform
    dome_r = u(58, 72)
    liver_center = np.array([-45.0, -15.0, 0.0]) + rng.normal(0, 4, 3)
    scale = u(0.86, 1.14) * u(0.92, 1.08, 3)
    rl = RIGHT_LOBE_SCALE[stage]
    cs = CAUDATE_SCALE[stage]

    portal = _vessel_tree(rng, [
        ((-22, -32, -12), (-62, -22, -4), 6.0, 5.0),
        ((-62, -22, -4), (-90, -55, 12), 4.5, 2.5),
        ((-62, -22, -4), (-100, 10, -18), 4.5, 2.5),
        ((-22, -32, -12), (-2, -42, 6), 5.0, 4.5),
        ((-2, -42, 6), (35, -58, 20), 4.0, 2.2),
        ((-2, -42, 6), (5, -72, 24), 3.5, 2.2),
    ])
    trunk = Segments()
    trunk.add((5, -15, -45), (-22, -32, -12), 7.5, 7.0)  # main portal vein to the hilum
    trunk.add((5, -15, -45), (70, 30, -4), 5.5, 5.0)     # splenic vein
    trunk.add((5, -15, -45), (12, -35, -130), 6.0, 6.0)  # superior mesenteric vein
    junction = (-20.0, -4.0, dome_r - 12.0)
    hepatic = _vessel_tree(rng, [
        (junction, (-112, -18, 5), 6.0, 2.5),
        (junction, (-48, -62, -5), 5.5, 2.5),
        (junction, (22, -58, 35), 5.0, 2.5),
    ])

    ivc = Segments()
    ivc.add((-22, 0, -300), junction, 11.0, 12.0)
    ivc.add(junction, (-12, -25, dome_r + 25), 12.0, 14.0)
    aorta = Segments()
    ar = u(9.5, 12.5)
    aorta.add((14, -6, -300), (14, -6, 40), ar, ar)
    aorta.add((14, -6, 40), (10, 10, 200), ar, ar + 1.0)
    aorta.add((14, -6, -25), (14, -35, -32), 3.5, 3.0)    # celiac trunk
    aorta.add((14, -35, -32), (-20, -38, -25), 2.8, 2.5)  # common hepatic artery
    aorta.add((14, -6, -42), (16, -40, -70), 3.5, 3.0)    # superior mesenteric artery

    kz = u(-72, -55)
    kidneys = [((-72.0, 50.0, kz), (26.0, 24.0, 50.0), rotation_matrix(0, 12, 28)),
               ((74.0, 48.0, kz + u(6, 16)), (26.0, 24.0, 50.0), rotation_matrix(0, -12, -28))]
    for i, (c, r, rot) in enumerate(kidneys):
        kidneys[i] = (tuple(_jit(rng, c, 3.0)), tuple(np.asarray(r) * u(0.9, 1.1)), rot)

    stomach = Segments()
    fundus = _jit(rng, (62, 8, 38), 5)
    body = _jit(rng, (45, -45, 0), 5)
    antrum = _jit(rng, (5, -62, -25), 4)
    stomach.add(fundus, body, u(28, 38), u(20, 28))
    stomach.add(body, antrum, u(20, 26), u(12, 16))
    stomach.add(antrum, (-22, -45, -32), 12.0, 10.0)

    pancreas = Segments()
    pancreas.add((-14, -30, -40), (10, -28, -30), 14.0, 11.0)
    pancreas.add((10, -28, -30), (48, 5, -18), 11.0, 9.0)
    pancreas.add((48, 5, -18), (72, 26, -8), 9.0, 7.0)

    bowel, bowel_fluid, colon_gas = Segments(), Segments(), Segments()
    colon = [((-95, 5, -170), (-92, -10, -75), 20), ((-92, -10, -75), (-45, -72, -65), 20),
             ((-45, -72, -65), (55, -65, -55), 18), ((55, -65, -55), (85, 15, -25), 18),
             ((85, 15, -25), (92, 25, -170), 17)]
    for a, b, r in colon:
        a, b = _jit(rng, a, 5), _jit(rng, b, 5)
        bowel.add(a, b, r, r)
        if rng.random() < 0.6:  # gas rises anteriorly in a supine patient
            shift = np.array([0.0, -0.45 * r, 0.0])
            colon_gas.add(a + shift, b + shift, 0.55 * r, 0.55 * r)
    for _ in range(int(u(10, 16))):
        a = np.array([u(-80, 80), u(-95, 0), u(-170, -70)])
        b = a + rng.normal(0, 1, 3) * u(15, 40)
        (bowel if rng.random() < 0.6 else bowel_fluid).add(a, b, u(9, 15), u(9, 15))

    mesenteric = Segments()  # small mesenteric veins running towards the superior mesenteric vein
    for _ in range(int(u(8, 14))):
        a = np.array([u(-70, 80), u(-90, -10), u(-170, -50)])
        mesenteric.add(a, np.array([12.0, -35.0, a[2] + u(0, 30)]) + rng.normal(0, 6, 3), u(1.8, 3.0), u(2.0, 3.2))

    spleen_scale = u(0.85, 1.1) * (1.0 + 0.09 * (stage - 1))
    sc = _jit(rng, (88, 48, 22), 4)
    spleen = (tuple(sc), tuple(np.array([27.0, 58.0, 46.0]) * spleen_scale), rotation_matrix(0, 0, -35))
    spleen_hilum = (tuple(sc + np.array([-30.0, -16.0, -4.0]) * spleen_scale),
                    tuple(np.array([20.0, 34.0, 30.0]) * spleen_scale))

    anatomy = Anatomy(
        stage=stage,
        half_x=u(140, 168), ant=u(108, 130), post=u(96, 106), fat=u(8, 28), wall=u(7, 10),
        dome_r=dome_r, dome_l=dome_r - u(6, 14),
        liver_center=liver_center, liver_scale=scale,
        liver_deform=Deformation.random(rng, amplitude=u(6, 12), n=3),
        nodules=SmoothField.random(rng, 10, (14.0, 30.0), NODULARITY_MM[stage]),
        hetero_field=SmoothField.random(rng, 10, (25.0, 70.0), 1.0),
        septa_field=SmoothField.random(rng, 12, (12.0, 30.0), 1.0),
        mottle_field=SmoothField.random(rng, 8, (30.0, 90.0), 1.0),
        right_lobe=(liver_center + np.array([-25.0, 8.0, 0.0]), np.array([68.0, 80.0, 80.0]) * rl * u(0.92, 1.08, 3)),
        left_lobe=(liver_center + np.array([55.0, -42.0, 18.0]),
                   np.array([u(40, 75), u(22, 32), u(30, 40)]), u(0.5, 0.7)),
        caudate=(liver_center + np.array([33.0, -7.0, 8.0]), np.array([17.0, 15.0, 28.0]) * cs),
        inferior_plane=(float(liver_center[2]) - u(34, 44), u(0.4, 0.6), u(0.1, 0.25)),
        gallbladder=(liver_center + np.array([12.0, -40.0, -42.0]), np.array([13.0, 13.0, 30.0]) * u(0.7, 1.1),
                     rotation_matrix(-35, 10, 0)),
        portal=portal, portal_trunk=trunk, hepatic=hepatic, spleen=spleen, spleen_hilum=spleen_hilum, kidneys=kidneys,
        stomach=stomach, gas_level=u(-75, -45), pancreas=pancreas, bowel=bowel, bowel_fluid=bowel_fluid, mesenteric=mesenteric,
        colon_gas=colon_gas, rib_phase=u(0, 30),
        ivc=ivc, aorta=aorta,
    )
    if n_tumors:
        anatomy.tumors = _place_tumors(rng, anatomy, n_tumors)
    return anatomy


def _place_tumors(rng: np.random.Generator, anatomy: Anatomy, n: int) -> list[tuple[np.ndarray, float]]:
    """Spherical lesions whose centres lie well inside the liver (checked with the liver itself)."""
    tumors: list[tuple[np.ndarray, float]] = []
    for _ in range(40 * n):
        if len(tumors) == n:
            break
        r = float(rng.uniform(7, 22))
        c = anatomy.liver_center + rng.normal(0, 1, 3) * np.array([45.0, 40.0, 35.0])
        pts = tuple(np.array([c[i]], np.float32) for i in range(3))
        q = anatomy.liver_frame(pts)
        cav = anatomy.cavity(pts)
        if anatomy.liver_sdf(pts, q, cav)[0] < -0.8 * r:
            tumors.append((np.array([float(v[0]) for v in q]), r))
    return tumors
