"""Rasterised renders of a trimesh mesh with pyrender, headless through EGL.

One OpenGL context per process (`get_renderer`), reused for every render; a mesh is uploaded once
per `MeshScene` and re-posed for each view. CPU machines get Mesa llvmpipe, GPU machines NVIDIA's
EGL. Camera convention: OpenCV (x right, y down, z forward), object-to-camera (4, 4) poses,
intrinsics in pixels with pixel (i, j) centred at u=i, v=j (see `refany3d.render.cameras`).
"""

from __future__ import annotations

import functools
import os
import threading
from dataclasses import dataclass
from typing import Literal

import numpy as np
import trimesh

from refany3d.render.cameras import CV_TO_GL

Mode = Literal["lit", "albedo", "geometry"]


@dataclass(frozen=True)
class Light:
    """A directional light. direction: (3,) the way light travels, in the OpenCV camera frame."""

    direction: tuple[float, float, float]
    intensity: float = 3.0
    color: tuple[float, float, float] = (1.0, 1.0, 1.0)


# A key light from the upper left behind the camera and a weaker fill from the right.
DEFAULT_LIGHTS = (Light((0.4, 0.6, 1.0), 3.0), Light((-0.6, 0.2, 1.0), 1.2))
DEFAULT_AMBIENT = 0.35


@dataclass(frozen=True)
class Render:
    """One view. rgb: (H, W, 3) uint8, black background, colour premultiplied by `alpha` (None for
    `geometry` mode); depth: (H, W) float32 z-depth in the mesh's units, 0 where empty; mask: (H, W)
    bool, depth > 0; alpha: (H, W) float32 antialiased coverage in [0, 1] (None for `geometry`)."""

    rgb: np.ndarray | None
    depth: np.ndarray
    mask: np.ndarray
    alpha: np.ndarray | None = None

    def over(self, background: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8: the render composited over a (H, W, 3) uint8 background."""
        out = self.rgb.astype(np.float32) + background.astype(np.float32) * (1.0 - self.alpha[..., None])
        return np.clip(out + 0.5, 0, 255).astype(np.uint8)


def _pyrender():
    """Import pyrender headless (pyglet must not open a shadow window first), through EGL unless
    `PYOPENGL_PLATFORM` says otherwise."""
    _load_triton_first()
    # The one write to the environment, made when the first context is about to be made, not at
    # import: PyOpenGL picks its platform from this variable when `OpenGL.platform` is first
    # imported, and pyrender's OffscreenRenderer reads it again; neither takes an argument.
    os.environ.setdefault("PYOPENGL_PLATFORM", "egl")
    import pyglet

    pyglet.options["shadow_window"] = False
    pyglet.options["headless"] = True
    import pyrender

    return pyrender


def _load_triton_first() -> None:
    # Mesa's llvmpipe and Triton each bring an LLVM; importing Triton *after* Mesa has loaded its
    # LLVM segfaults the process (seen on Debian 12: render, then load a transformers model or
    # compile with inductor). Triton first is safe, so a process that renders loads it up front.
    try:
        import triton  # noqa: F401
    except ImportError:
        pass


class _GlLock:
    """The process's one GL context (and its reused read-back buffers) serves one thread at a
    time: every pass takes this lock, and a caller of `render_raw`/`read_atlas` holds it until it
    has consumed the arrays. Re-entrant; leaving the outermost hold releases the EGL context from
    the thread, since a context can be current in one thread only and the next holder may be
    another thread (the flow's thread runner)."""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._held = threading.local()

    def __enter__(self) -> _GlLock:
        self._lock.acquire()
        self._held.depth = getattr(self._held, "depth", 0) + 1
        return self

    def __exit__(self, *exc) -> None:
        self._held.depth -= 1
        try:
            if self._held.depth == 0 and get_renderer.cache_info().currsize:
                _release_context(get_renderer()._platform)
        finally:
            self._lock.release()


def _release_context(platform) -> None:
    display = getattr(platform, "_egl_display", None)
    if display is not None:
        from OpenGL.EGL import EGL_NO_CONTEXT, EGL_NO_SURFACE, eglMakeCurrent

        eglMakeCurrent(display, EGL_NO_SURFACE, EGL_NO_SURFACE, EGL_NO_CONTEXT)


GL_LOCK = _GlLock()


def _holding_gl_lock(method):
    @functools.wraps(method)
    def locked(*args, **kwargs):
        with GL_LOCK:
            return method(*args, **kwargs)

    return locked


@functools.lru_cache(maxsize=1)
def get_renderer():
    """The process's one `pyrender.OffscreenRenderer` (the viewport is resized per call).

    Its inner renderer is `_raw_renderer_class()`: pyrender's own unless `raw_pass` is active."""
    offscreen = _pyrender().OffscreenRenderer(64, 64)
    # pyrender's Renderer makes no GL objects before its first render: swap it for the subclass.
    offscreen._renderer = _raw_renderer_class()(64, 64)
    return offscreen


@functools.lru_cache(maxsize=1)
def gl_renderer_name() -> str:
    """GL_RENDERER of the process's context, e.g. "llvmpipe (LLVM 15.0.6, 256 bits)"."""
    from OpenGL import GL

    with GL_LOCK:
        offscreen = get_renderer()
        offscreen._platform.make_current()
        name = GL.glGetString(GL.GL_RENDERER)
    return name.decode() if isinstance(name, bytes) else str(name)


@functools.lru_cache(maxsize=1)
def _raw_renderer_class():
    """pyrender's `Renderer` with a raw read-back mode (pyrender 0.1.45 internals, pinned).

    With `raw` set, a pass returns (RGBA or None, depth) exactly as read: rows bottom-up, depth
    the window depth in [0, 1] (1 = empty), no per-pass numpy linearisation; both arrays are
    read-back buffers reused by the next raw pass of the same size. With `single_sample`
    set, it draws into pyrender's single-sample framebuffer instead of the 4x multisampled one:
    colour and depth are both sampled at pixel centres (exact geometry, aliased edges) from one
    pass, and no resolve blit is needed."""
    pyrender = _pyrender()
    from OpenGL import GL

    offscreen_flag = pyrender.RenderFlags.OFFSCREEN
    depth_only = pyrender.RenderFlags.DEPTH_ONLY

    class RawRenderer(pyrender.renderer.Renderer):
        raw = False
        single_sample = False
        # Atlas mode (`MeshScene.draw_tile`): the framebuffer is `atlas` = (width, height) and a pass
        # draws into the viewport-sized tile at `tile` = (x, y) (lower left, GL pixels), clearing
        # that tile only and reading nothing back; `read_atlas` reads many tiles at once.
        atlas: tuple[int, int] | None = None
        tile = (0, 0)

        def _configure_main_framebuffer(self):
            if self.atlas is None:
                return super()._configure_main_framebuffer()
            view = self.viewport_width, self.viewport_height
            self.viewport_width, self.viewport_height = self.atlas
            try:  # allocated at the atlas size, kept while that size stays
                super()._configure_main_framebuffer()
            finally:
                self.viewport_width, self.viewport_height = view

        def _configure_forward_pass_viewport(self, flags):
            super()._configure_forward_pass_viewport(flags)
            if self.single_sample and flags & offscreen_flag:
                GL.glBindFramebuffer(GL.GL_DRAW_FRAMEBUFFER, self._main_fb)
            if self.atlas is not None:
                x, y = self.tile
                GL.glViewport(x, y, self.viewport_width, self.viewport_height)
                GL.glEnable(GL.GL_SCISSOR_TEST)  # the pass's clear then touches its own tile only
                GL.glScissor(x, y, self.viewport_width, self.viewport_height)

        def _read_main_framebuffer(self, scene, flags):
            if self.atlas is not None:
                GL.glDisable(GL.GL_SCISSOR_TEST)
                return None, None
            if not self.raw:
                return super()._read_main_framebuffer(scene, flags)
            width, height = self._main_fb_dims
            if not self.single_sample:  # resolve the multisampled colour (depth: one sample)
                GL.glBindFramebuffer(GL.GL_READ_FRAMEBUFFER, self._main_fb_ms)
                GL.glBindFramebuffer(GL.GL_DRAW_FRAMEBUFFER, self._main_fb)
                bits = GL.GL_COLOR_BUFFER_BIT | GL.GL_DEPTH_BUFFER_BIT
                GL.glBlitFramebuffer(0, 0, width, height, 0, 0, width, height, bits, GL.GL_NEAREST)
            return self.read_region(0, 0, width, height, color=not flags & depth_only)

        def read_region(self, x: int, y: int, width: int, height: int, color: bool = True):
            """(RGBA (H, W, 4) uint8 or None, window depth (H, W) float32) of a region of the
            single-sample framebuffer, rows bottom-up, into reused buffers (one pair per size)."""
            GL.glBindFramebuffer(GL.GL_READ_FRAMEBUFFER, self._main_fb)
            buffers = self.__dict__.setdefault("_raw_buffers", {})
            if (height, width) not in buffers:
                if len(buffers) >= 4:  # sizes change with the images: keep a few, not all
                    buffers.clear()
                # reused read-back buffers: fresh pages cost more than the copy on some VMs
                buffers[height, width] = (
                    np.empty((height, width), np.float32),
                    np.empty((height, width, 4), np.uint8),
                )
            depth, rgba = buffers[height, width]
            GL.glPixelStorei(GL.GL_PACK_ALIGNMENT, 1)  # tight rows for any width
            GL.glReadPixels(x, y, width, height, GL.GL_DEPTH_COMPONENT, GL.GL_FLOAT, depth)
            if not color:
                return None, depth
            # RGBA: the framebuffer's own format (GL_RGB would make the driver repack on the CPU)
            GL.glReadPixels(x, y, width, height, GL.GL_RGBA, GL.GL_UNSIGNED_BYTE, rgba)
            return rgba, depth

    return RawRenderer


def _material(pyrender, mesh: trimesh.Trimesh):
    """(material, texcoords per vertex or None, colours per vertex or None) of a trimesh mesh."""
    visual = mesh.visual
    kwargs = dict(metallicFactor=0.0, roughnessFactor=0.9, alphaMode="OPAQUE")
    if visual.kind == "texture" and visual.uv is not None:
        mat = visual.material
        image = getattr(mat, "baseColorTexture", None)
        image = getattr(mat, "image", None) if image is None else image
        factor = getattr(mat, "baseColorFactor", None)
        if factor is None:
            factor = getattr(mat, "diffuse", None)
        factor = np.asarray(factor if factor is not None else [255, 255, 255, 255], dtype=np.float64)
        factor = factor / 255.0 if factor.max() > 1.0 else factor
        if image is None:
            return pyrender.MetallicRoughnessMaterial(baseColorFactor=factor, **kwargs), None, None
        texture = pyrender.Texture(source=np.asarray(image.convert("RGB")), source_channels="RGB")
        material = pyrender.MetallicRoughnessMaterial(baseColorTexture=texture, **kwargs)
        return material, np.asarray(visual.uv, dtype=np.float32), None
    if visual.kind in ("vertex", "face"):
        colors = visual.vertex_colors if visual.kind == "vertex" else visual.face_colors
        material = pyrender.MetallicRoughnessMaterial(baseColorFactor=[1.0, 1.0, 1.0, 1.0], **kwargs)
        return material, None, np.asarray(colors)
    material = pyrender.MetallicRoughnessMaterial(baseColorFactor=[0.7, 0.7, 0.7, 1.0], **kwargs)
    return material, None, None


Normals = Literal["face", "vertex", "none"]


def _primitive(pyrender, mesh: trimesh.Trimesh, normals: Normals):
    material, uv, colors = _material(pyrender, mesh)
    face_colors = colors is not None and len(colors) == len(mesh.faces) and mesh.visual.kind == "face"
    if normals != "face" and not face_colors:  # indexed vertices, as stored
        attrs = dict(positions=mesh.vertices, indices=mesh.faces, texcoord_0=uv, color_0=colors)
        attrs["normals"] = mesh.vertex_normals if normals == "vertex" else None
    else:  # one vertex per face corner
        corners = mesh.faces.reshape(-1)
        attrs = dict(positions=mesh.vertices[corners], texcoord_0=None if uv is None else uv[corners])
        attrs["normals"] = None if normals == "none" else np.repeat(mesh.face_normals, 3, axis=0)
        attrs["color_0"] = (
            None if colors is None else (np.repeat(colors, 3, 0) if face_colors else colors[corners])
        )
    return pyrender.Primitive(material=material, mode=4, **attrs)


class MeshScene:
    """A mesh uploaded once, rendered from many poses (one pyrender scene, reused).

    meshes: one trimesh mesh or several (a composite object), all in the object frame.
    normals: what `lit` passes shade with: `face` (faceted), `vertex` (smooth) or `none` (no
    normals uploaded, unlit `albedo`/`geometry` passes only: the cheapest upload).
    """

    def __init__(self, meshes: trimesh.Trimesh | list[trimesh.Trimesh], normals: Normals = "face") -> None:
        pyrender = self._pr = _pyrender()
        parts = [meshes] if isinstance(meshes, trimesh.Trimesh) else list(meshes)
        prims = [_primitive(pyrender, m, normals) for m in parts]
        self.normals = normals
        self.scene = pyrender.Scene(bg_color=[0.0, 0.0, 0.0, 0.0], ambient_light=[DEFAULT_AMBIENT] * 3)
        self.node = self.scene.add(pyrender.Mesh(prims), pose=np.eye(4))
        self.camera = pyrender.IntrinsicsCamera(1.0, 1.0, 0.0, 0.0, znear=0.01, zfar=100.0)
        self.scene.add(self.camera, pose=np.eye(4))
        self._light_nodes: list = []
        self._lights: tuple[Light, ...] | None = None
        # a sphere around the bounding box: it bounds the depth range of any view
        low = np.min([m.bounds[0] for m in parts], axis=0)
        high = np.max([m.bounds[1] for m in parts], axis=0)
        self.center = (low + high) / 2.0
        self.radius = float(np.linalg.norm(high - low) / 2.0)

    def _set_lights(self, lights: tuple[Light, ...], ambient: float) -> None:
        self.scene.ambient_light = np.array([ambient] * 3)
        if lights == self._lights:
            return
        for node in self._light_nodes:
            self.scene.remove_node(node)
        self._light_nodes = []
        for light in lights:
            travel = CV_TO_GL[:3, :3] @ np.asarray(light.direction, dtype=np.float64)
            travel /= np.linalg.norm(travel)
            pose = np.eye(4)  # a pyrender directional light shines along its node's −z
            z = -travel
            x = np.cross([0.0, 1.0, 0.0] if abs(z[1]) < 0.9 else [1.0, 0.0, 0.0], z)
            x /= np.linalg.norm(x)
            pose[:3, :3] = np.stack([x, np.cross(z, x), z], axis=1)
            node = self._pr.DirectionalLight(color=np.asarray(light.color), intensity=light.intensity)
            self._light_nodes.append(self.scene.add(node, pose=pose))
        self._lights = lights

    def _check_mode(self, mode: Mode) -> None:
        if mode == "lit" and self.normals == "none":
            raise ValueError("a `lit` pass needs normals: make the MeshScene with normals='face' or 'vertex'")

    def _place(self, pose: np.ndarray, intrinsics: np.ndarray, width: int, height: int):
        """Set camera intrinsics, a depth range hugging the object, the object's pose and the
        viewport; returns the process's renderer."""
        k = np.asarray(intrinsics, dtype=np.float64)
        # pyrender puts pixel centres at +0.5; OpenCV at integers.
        self.camera.fx, self.camera.fy = k[0, 0], k[1, 1]
        self.camera.cx, self.camera.cy = k[0, 2] + 0.5, k[1, 2] + 0.5
        dist = float(np.linalg.norm(pose[:3, :3] @ self.center + pose[:3, 3]))
        self.camera.znear = max(dist - 1.05 * self.radius, 1e-3 * max(dist, 1e-3))
        self.camera.zfar = dist + 1.05 * self.radius
        self.scene.set_pose(self.node, CV_TO_GL @ np.asarray(pose, dtype=np.float64))
        renderer = get_renderer()
        renderer.viewport_width, renderer.viewport_height = int(width), int(height)
        return renderer

    @_holding_gl_lock
    def render_raw(
        self,
        pose: np.ndarray,
        intrinsics: np.ndarray,
        width: int,
        height: int,
        mode: Mode = "albedo",
        single_sample: bool = True,
        background: tuple[float, float, float] = (0.0, 0.0, 0.0),
        lights: tuple[Light, ...] = DEFAULT_LIGHTS,
        ambient: float = DEFAULT_AMBIENT,
    ) -> tuple[np.ndarray | None, np.ndarray, float, float]:
        """One pass, read back raw: (rgba (H, W, 4) uint8, colour over `background` (RGB in
        [0, 1]), or None for `geometry`, window depth (H, W) float32 in [0, 1] with 1 = empty, znear, zfar),
        rows bottom-up (OpenGL order). Multisampled edges blend with the background: compositing
        happens in GL, not on the host.

        single_sample: draw without multisampling, so depth and colour are sampled at pixel
        centres (exact geometry, aliased colour edges); otherwise colour is 4x-MSAA resolved and
        depth is one multisample (off the pixel centre). See `window_depth_to_z`. The arrays are
        reused by the next raw pass: consume or copy them first."""
        pr = self._pr
        self._check_mode(mode)
        renderer = self._place(pose, intrinsics, width, height)
        if mode == "geometry":
            flags = pr.RenderFlags.DEPTH_ONLY
        else:
            self._set_lights(lights if mode == "lit" else (), ambient)
            flags = pr.RenderFlags.FLAT if mode == "albedo" else pr.RenderFlags.NONE
        inner = renderer._renderer
        inner.raw, inner.single_sample = True, single_sample
        self.scene.bg_color = np.array([*background, 0.0])
        try:
            out = renderer.render(self.scene, flags=flags)
        finally:
            inner.raw, inner.single_sample = False, False
            self.scene.bg_color = np.zeros(4)  # `render` reads coverage from a transparent black
        rgb, depth = out
        return rgb, depth, float(self.camera.znear), float(self.camera.zfar)

    @_holding_gl_lock
    def draw_tile(
        self,
        pose: np.ndarray,
        intrinsics: np.ndarray,
        width: int,
        height: int,
        atlas: tuple[int, int],
        tile: tuple[int, int],
        mode: Mode = "albedo",
        background: tuple[float, float, float] = (0.0, 0.0, 0.0),
        lights: tuple[Light, ...] = DEFAULT_LIGHTS,
        ambient: float = DEFAULT_AMBIENT,
    ) -> tuple[float, float]:
        """Queue one single-sample pass (as `render_raw`) into the `width`×`height` tile whose lower
        left corner is `tile` = (x, y), in GL pixels, of a framebuffer of size `atlas` = (width,
        height); nothing is read back. Draw many views, then `read_atlas` once: one GPU sync and
        one transfer instead of one per view. Returns the pass's (znear, zfar)."""
        inner = get_renderer()._renderer
        inner.atlas, inner.tile = (int(atlas[0]), int(atlas[1])), (int(tile[0]), int(tile[1]))
        try:
            _, _, near, far = self.render_raw(
                pose, intrinsics, width, height, mode, True, background, lights, ambient
            )
        finally:
            inner.atlas = None
        return near, far

    @_holding_gl_lock
    def read_atlas(self, width: int, height: int) -> tuple[np.ndarray, np.ndarray]:
        """(RGBA (H, W, 4) uint8, window depth (H, W) float32, 1 = empty) of the lower-left
        `width`×`height` of the framebuffer the `draw_tile` passes drew into, rows bottom-up. The
        arrays are reused by the next read of the same size: consume or copy them first."""
        renderer = get_renderer()
        renderer._platform.make_current()
        return renderer._renderer.read_region(0, 0, int(width), int(height))

    @_holding_gl_lock
    def render(
        self,
        pose: np.ndarray,
        intrinsics: np.ndarray,
        width: int,
        height: int,
        mode: Mode = "lit",
        lights: tuple[Light, ...] = DEFAULT_LIGHTS,
        ambient: float = DEFAULT_AMBIENT,
        exact: bool = True,
    ) -> Render:
        """Render at `pose` (4, 4 object-to-camera, OpenCV) with `intrinsics` (3, 3, px).

        mode: `lit` (PBR with `lights` + ambient), `albedo` (unlit base colour), `geometry`
        (depth and mask only, sampled at pixel centres without multisampling: exact geometry).
        exact: for `lit`/`albedo`, take depth and mask from a second, `geometry` pass; otherwise
        they come from the multisampled colour pass, whose depth is sampled off the pixel centre.
        """
        pr = self._pr
        self._check_mode(mode)
        renderer = self._place(pose, intrinsics, width, height)
        if mode == "geometry" or exact:
            # SEG turns multisampling off: depth is sampled at pixel centres, like the ray caster.
            seg = {self.node: (255, 255, 255)}
            _, depth = renderer.render(self.scene, flags=pr.RenderFlags.SEG, seg_node_map=seg)
            if mode == "geometry":
                return Render(None, depth, depth > 0)
        self._set_lights(lights if mode == "lit" else (), ambient)
        flags = pr.RenderFlags.RGBA | (pr.RenderFlags.FLAT if mode == "albedo" else pr.RenderFlags.NONE)
        rgba, ms_depth = renderer.render(self.scene, flags=flags)
        depth = depth if exact else ms_depth
        alpha = rgba[..., 3].astype(np.float32) / 255.0
        return Render(np.ascontiguousarray(rgba[..., :3]), depth, depth > 0, alpha)


def window_depth_to_z(depth: np.ndarray, znear: float, zfar: float) -> np.ndarray:
    """(H, W) float32 window depth in [0, 1] of a perspective pass with planes `znear`/`zfar` →
    (H, W) float32 z-depth, 0 where empty (window depth 1)."""
    d = np.asarray(depth, dtype=np.float32)
    z = np.multiply(d, np.float32(znear - zfar))
    z += np.float32(zfar)
    np.divide(np.float32(znear * zfar), z, out=z)
    z *= d < 1.0  # a whole-array product, not masked indexing: numpy keeps it free of the GIL
    return z


def render(
    mesh: trimesh.Trimesh | list[trimesh.Trimesh],
    pose: np.ndarray,
    intrinsics: np.ndarray,
    width: int,
    height: int,
    mode: Mode = "lit",
    lights: tuple[Light, ...] = DEFAULT_LIGHTS,
    ambient: float = DEFAULT_AMBIENT,
    exact: bool = True,
) -> Render:
    """One-off render of `mesh` (uploads it; use `MeshScene` to render one mesh many times)."""
    return MeshScene(mesh).render(pose, intrinsics, width, height, mode, lights, ambient, exact)
